#!/bin/bash
# TIPC chain for one model config: train -> eval -> export -> infer (every combination of the
# config's inference lists), one `Run successfully` / `Run failed` line per command.
#
#   bash test_tipc/prepare.sh CONFIG MODE
#   bash test_tipc/test_train_inference_python.sh CONFIG MODE
#
# MODE: lite_train_lite_infer | lite_train_whole_infer | whole_infer | whole_train_whole_infer
# Results: test_tipc/output/<model_name>/<MODE>/results_python.log (+ a log per command).
# Exit code: 0 when every command ran successfully, 1 otherwise, 2 for bad arguments.

source "$(dirname "$0")/common_func.sh"
func_tipc_setup test_train_inference_python.sh "$@"

# train params
model_name=$(func_parser_value "${lines[1]}")
python=$(func_parser_value "${lines[2]}")
gpu_list=$(func_parser_value "${lines[3]}")
train_use_gpu_key=$(func_parser_key "${lines[4]}")
train_use_gpu_value=$(func_parser_value "${lines[4]}")
autocast_list=$(func_parser_value "${lines[5]}")
autocast_key=$(func_parser_key "${lines[5]}")
epoch_key=$(func_parser_key "${lines[6]}")
epoch_num=$(func_parser_params "${lines[6]}" "${MODE}")
save_model_key=$(func_parser_key "${lines[7]}")
train_batch_key=$(func_parser_key "${lines[8]}")
train_batch_value=$(func_parser_params "${lines[8]}" "${MODE}")
pretrain_model_key=$(func_parser_key "${lines[9]}")
pretrain_model_value=$(func_parser_value "${lines[9]}")
train_model_name=$(func_parser_value "${lines[10]}")
train_infer_img_dir=$(func_parser_value "${lines[11]}")
train_param_key1=$(func_parser_key "${lines[12]}")
train_param_value1=$(func_parser_value "${lines[12]}")

trainer_list=$(func_parser_value "${lines[14]}")
trainer_norm=$(func_parser_key "${lines[15]}")
norm_trainer=$(func_parser_value "${lines[15]}")

# eval params
eval_py=$(func_parser_value "${lines[23]}")
eval_key1=$(func_parser_key "${lines[24]}")
eval_value1=$(func_parser_value "${lines[24]}")

# export params
save_infer_key=$(func_parser_key "${lines[27]}")
export_weight=$(func_parser_key "${lines[28]}")
norm_export=$(func_parser_value "${lines[29]}")
inference_dir=$(func_parser_value "${lines[35]}")

# whole_infer: already trained models, and the export to run on each (null: already exported)
infer_model_dir_list=$(func_parser_value "${lines[36]}")
infer_export_list=$(func_parser_value "${lines[37]}")

# infer params
inference_py=$(func_parser_value "${lines[39]}")
use_gpu_key=$(func_parser_key "${lines[40]}")
use_gpu_list=$(func_parser_value "${lines[40]}")
use_mkldnn_key=$(func_parser_key "${lines[41]}")
use_mkldnn_list=$(func_parser_value "${lines[41]}")
cpu_threads_key=$(func_parser_key "${lines[42]}")
cpu_threads_list=$(func_parser_value "${lines[42]}")
batch_size_key=$(func_parser_key "${lines[43]}")
batch_size_list=$(func_parser_value "${lines[43]}")
use_trt_key=$(func_parser_key "${lines[44]}")
use_trt_list=$(func_parser_value "${lines[44]}")
precision_key=$(func_parser_key "${lines[45]}")
precision_list=$(func_parser_value "${lines[45]}")
infer_model_key=$(func_parser_key "${lines[46]}")
image_dir_key=$(func_parser_key "${lines[47]}")
infer_img_dir=$(func_parser_value "${lines[47]}")
save_log_key=$(func_parser_key "${lines[48]}")
benchmark_key=$(func_parser_key "${lines[49]}")
benchmark_value=$(func_parser_value "${lines[49]}")
infer_save_key=$(func_parser_key "${lines[50]}")

# A fresh folder per run: results_python.log and the benchmark logs are appended to, and a
# leftover line from an earlier run would make this run's result unreadable.
LOG_PATH="./test_tipc/output/${model_name}/${MODE}"
rm -rf "${LOG_PATH}"
mkdir -p "${LOG_PATH}"
status_log="${LOG_PATH}/results_python.log"
: > "${status_log}"
skip_log="${LOG_PATH}/skipped_python.log"
failed=0

# Run one command (it redirects to its own log), record it, and show the log's end on failure.
function run_check(){
    local command=$1
    local log_file=$2
    eval "${command}"
    local status=$?
    status_check ${status} "${command}" "${status_log}"
    if [ ${status} -ne 0 ]; then
        failed=$((failed + 1))
        tail -n 15 "${log_file}"
    fi
}

# GPU lines need a CUDA build of Paddle and a visible GPU; without them they are skipped with a
# note (in skipped_python.log, not results_python.log) rather than reported as failures.
gpu_state=""
function gpu_ready(){
    if [ -z "${gpu_state}" ]; then
        if ${python} -c "import sys, paddle; sys.exit(0 if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else 1)" > /dev/null 2>&1; then
            gpu_state=yes
        else
            gpu_state=no
        fi
    fi
    [ "${gpu_state}" = "yes" ]
}

function skip_gpu(){
    echo "Skipped on GPU - $1: this Paddle build is CPU-only or sees no GPU (paddle.device.is_compiled_with_cuda() / cuda.device_count())" | tee -a "${skip_log}"
}

# export_model.py SCRIPT_AND_ARGS of the model file WEIGHTS into SAVE_DIR, logged to LOG.
function run_export(){
    local set_export_weight=$(func_set_params "${export_weight}" "$2")
    local set_save_infer_key=$(func_set_params "${save_infer_key}" "$3")
    run_check "${python} $1 ${set_export_weight} ${set_save_infer_key} > $4 2>&1 " "$4"
}

# One inference command of func_inference (its locals and loop variables are in scope): the
# settings every device shares, plus the device's own ($2), logged as $1.
function run_infer(){
    local _name=$1
    local set_infer_data=$(func_set_params "${image_dir_key}" "${_img_dir}")
    local set_benchmark=$(func_set_params "${benchmark_key}" "${benchmark_value}")
    local set_batchsize=$(func_set_params "${batch_size_key}" "${batch_size}")
    local set_precision=$(func_set_params "${precision_key}" "${precision}")
    local set_model_dir=$(func_set_params "${infer_model_key}" "${_model_dir}")
    local set_save_log=$(func_set_params "${save_log_key}" "${_log_path}/${_name}_benchmark.log")
    local set_save_pred=$(func_set_params "${infer_save_key}" "${_log_path}/infer_output/${_name}")
    local command="${_python} ${_script} ${use_gpu_key}=${use_gpu} $2 ${set_precision} ${set_model_dir} ${set_batchsize} ${set_infer_data} ${set_benchmark} ${set_save_log} ${set_save_pred} > ${_log_path}/${_name}.log 2>&1 "
    run_check "${command}" "${_log_path}/${_name}.log"
}

function func_inference(){
    local _python=$1
    local _script=$2
    local _model_dir=$3
    local _log_path=$4
    local _img_dir=$5
    local _gpu=$6
    IFS="|"
    for use_gpu in ${use_gpu_list[*]}; do
        if [ "${use_gpu}" = "False" ] || [ "${use_gpu}" = "cpu" ]; then
            for use_mkldnn in ${use_mkldnn_list[*]}; do
                for threads in ${cpu_threads_list[*]}; do
                    for batch_size in ${batch_size_list[*]}; do
                        for precision in ${precision_list[*]}; do
                            # Reduced precision on CPU exists only through oneDNN.
                            if [ "${use_mkldnn}" = "False" ] && [ "${precision}" != "fp32" ]; then
                                continue
                            fi
                            _name="python_infer_cpu_gpus_${_gpu}_usemkldnn_${use_mkldnn}_threads_${threads}_precision_${precision}_batchsize_${batch_size}"
                            set_mkldnn=$(func_set_params "${use_mkldnn_key}" "${use_mkldnn}")
                            set_cpu_threads=$(func_set_params "${cpu_threads_key}" "${threads}")
                            run_infer "${_name}" "${set_mkldnn} ${set_cpu_threads}"
                        done
                    done
                done
            done
        elif [ "${use_gpu}" = "True" ] || [ "${use_gpu}" = "gpu" ]; then
            if ! gpu_ready; then
                skip_gpu "inference of ${_model_dir} with ${use_gpu_key}=${use_gpu}"
                continue
            fi
            for use_trt in ${use_trt_list[*]}; do
                for precision in ${precision_list[*]}; do
                    # fp16/int8 on GPU go through TensorRT.
                    if [ "${use_trt}" = "False" ] && [ "${precision}" != "fp32" ]; then
                        continue
                    fi
                    for batch_size in ${batch_size_list[*]}; do
                        _name="python_infer_gpu_gpus_${_gpu}_usetrt_${use_trt}_precision_${precision}_batchsize_${batch_size}"
                        set_tensorrt=$(func_set_params "${use_trt_key}" "${use_trt}")
                        run_infer "${_name}" "${set_tensorrt}"
                    done
                done
            done
        else
            echo "Does not support hardware other than CPU and GPU: ${use_gpu_key}=${use_gpu}" | tee -a "${skip_log}"
        fi
    done
}

if [ "${MODE}" = "whole_infer" ]; then
    # No training: export each already trained model (test_tipc/prepare.sh provides it), then infer
    # on the whole test images.
    IFS="|"
    infer_run_exports=(${infer_export_list})
    Count=0
    for infer_model in ${infer_model_dir_list[*]}; do
        if [ "${infer_run_exports[Count]}" != "null" ]; then
            save_infer_dir="${LOG_PATH}/inference_${Count}"
            run_export "${infer_run_exports[Count]}" "${infer_model}" "${save_infer_dir}" "${LOG_PATH}/export_${Count}.log"
        else
            save_infer_dir=${infer_model}
        fi
        func_inference "${python}" "${inference_py}" "${save_infer_dir}" "${LOG_PATH}" "${infer_img_dir}" "-1"
        Count=$((Count + 1))
    done
else
    IFS="|"
    train_use_gpu_values=(${train_use_gpu_value})
    Count=0
    for gpu in ${gpu_list[*]}; do
        train_use_gpu=${train_use_gpu_values[Count]}
        Count=$((Count + 1))
        if [ "${gpu}" = "-1" ]; then
            env=""
        else
            if ! gpu_ready; then
                skip_gpu "train/eval/export/infer with ${train_use_gpu_key}=${train_use_gpu} on GPU ${gpu}"
                continue
            fi
            # These scripts run one process on one device: the first GPU of a list.
            IFS=","
            array=(${gpu})
            env="export CUDA_VISIBLE_DEVICES=${array[0]}"
            IFS="|"
        fi
        for autocast in ${autocast_list[*]}; do
            for trainer in ${trainer_list[*]}; do
                # The anomaly detectors have one way to train; pact/fpgm/distill stay null in the configs.
                if [ "${trainer}" != "${trainer_norm}" ]; then
                    echo "Unknown trainer ${trainer} in ${FILENAME}: only ${trainer_norm} is defined" >&2
                    failed=$((failed + 1))
                    continue
                fi
                save_log="${LOG_PATH}/${trainer}_gpus_${gpu}_autocast_${autocast}"
                set_autocast=$(func_set_params "${autocast_key}" "${autocast}")
                set_epoch=$(func_set_params "${epoch_key}" "${epoch_num}")
                set_pretrain=$(func_set_params "${pretrain_model_key}" "${pretrain_model_value}")
                set_batchsize=$(func_set_params "${train_batch_key}" "${train_batch_value}")
                set_train_params1=$(func_set_params "${train_param_key1}" "${train_param_value1}")
                set_use_gpu=$(func_set_params "${train_use_gpu_key}" "${train_use_gpu}")
                set_save_model=$(func_set_params "${save_model_key}" "${save_log}")
                eval "${env}"

                train_log_path="${save_log}_train.log"
                cmd="${python} ${norm_trainer} ${set_use_gpu} ${set_save_model} ${set_epoch} ${set_pretrain} ${set_autocast} ${set_batchsize} ${set_train_params1} > ${train_log_path} 2>&1 "
                run_check "${cmd}" "${train_log_path}"

                # eval.py reads <save_path>/<category>.pdparams and stores its thresholds back there.
                if [ "${eval_py}" != "null" ]; then
                    set_eval_params1=$(func_set_params "${eval_key1}" "${eval_value1}")
                    eval_log_path="${save_log}_eval.log"
                    eval_cmd="${python} ${eval_py} ${set_use_gpu} ${set_save_model} ${set_eval_params1} > ${eval_log_path} 2>&1 "
                    run_check "${eval_cmd}" "${eval_log_path}"
                fi

                if [ "${norm_export}" != "null" ]; then
                    save_infer_path="${save_log}/inference"
                    run_export "${norm_export}" "${save_log}/${train_model_name}" "${save_infer_path}" "${save_log}_export.log"

                    if [ "${inference_dir}" != "null" ] && [ "${inference_dir}" != "##" ]; then
                        infer_model_dir="${save_infer_path}/${inference_dir}"
                    else
                        infer_model_dir=${save_infer_path}
                    fi
                    func_inference "${python}" "${inference_py}" "${infer_model_dir}" "${LOG_PATH}" "${train_infer_img_dir}" "${gpu}"
                fi
                if [ -n "${env}" ]; then
                    unset CUDA_VISIBLE_DEVICES
                fi
            done
        done
    done
fi

IFS=$' \t\n'
echo "${model_name} ${MODE}: $(grep -c '^Run successfully' "${status_log}") succeeded, ${failed} failed; see ${status_log}"
if [ ${failed} -ne 0 ]; then
    exit 1
fi
exit 0
