#!/bin/bash
# Data and weights for one TIPC config and mode, all under test_tipc/data/ (git-ignored):
#
#   bash test_tipc/prepare.sh CONFIG MODE
#
# test_tipc/data/mvtec/bottle  the data every config reads (--data_path ./test_tipc/data/mvtec):
#   lite_train_lite_infer    10 train/good images (evenly spaced) + 2 test images per folder, copied
#                            from a local MVTec AD: TIPC_MVTEC_DIR, else ../shared/data/mvtec_lite
#                            (AD_SHARED_DIR overrides ../shared), else the bundled demo_data/ (60 train,
#                            5 test images per folder); else the MVTec bottle download when online;
#                            else a synthetic set (test_tipc/make_synthetic_mvtec.py)
#   lite_train_whole_infer   the same 10 train images and the whole test set
#   whole_train_whole_infer, a link to the full data set: TIPC_MVTEC_DIR, else the download
#   whole_infer
# test_tipc/data/weights/resnet18_imagenet_layer1-3.pdparams  the backbone: ../shared/weights when
#   present, else the bundled weights/, else the official Paddle ImageNet weights when online, else
#   random (warned: the chain runs, the scores mean nothing)
# EfficientAD: test_tipc/data/weights/efficientad_teacher_small.pdparams: TIPC_TEACHER_WEIGHTS, else
#   (lite modes only) distilled here from the backbone in a few steps
# whole_infer: the config's train_model, fitted here on the full data when it is missing

source "$(dirname "$0")/common_func.sh"
func_tipc_setup prepare.sh "$@"

model_name=$(func_parser_value "${lines[1]}")
python=$(func_parser_value "${lines[2]}")
epoch_key=$(func_parser_key "${lines[6]}")
train_batch_key=$(func_parser_key "${lines[8]}")
pretrain_model_key=$(func_parser_key "${lines[9]}")
pretrain_model_value=$(func_parser_value "${lines[9]}")
norm_trainer=$(func_parser_value "${lines[15]}")
train_model=$(func_parser_value "${lines[36]}")
IFS=$' \t\n'

DATA_DIR=./test_tipc/data
CATEGORY=bottle
# The lite set checks that the chain runs, not accuracy: small, so that the 11 commands of a
# model take about a minute. Two test images per folder still fill one batch of --batch_size 2.
LITE_TRAIN=10        # train/good images in the lite set
LITE_TEST=2          # test images per folder (good and each defect) in the lite set
SHARED=${AD_SHARED_DIR:-../shared}
BUNDLED_DATA=./demo_data   # what the repository carries: a lite set for a clone without ../shared
MVTEC_URL=${TIPC_MVTEC_URL:-https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420937370-1629951468/bottle.tar.xz}
R18_FILE=resnet18_imagenet_layer1-3.pdparams
TEACHER=${DATA_DIR}/weights/efficientad_teacher_small.pdparams
LITE_DISTILL_STEPS=20

function die(){
    echo "prepare.sh: $1" >&2
    exit 1
}

function has_category(){
    [ -n "$1" ] && [ -d "$1/${CATEGORY}/train/good" ] && [ -d "$1/${CATEGORY}/test" ]
}

# The MVTec bottle archive into test_tipc/data/download; prints its root, nothing when offline.
function download_mvtec(){
    local dest=${DATA_DIR}/download
    if has_category "${dest}"; then
        echo "${dest}"
        return
    fi
    if ! curl -sI --connect-timeout 5 --max-time 15 "${MVTEC_URL}" > /dev/null 2>&1; then
        return
    fi
    mkdir -p "${dest}"
    echo "prepare.sh: downloading ${MVTEC_URL}" >&2
    if curl -fL --connect-timeout 10 -o "${dest}/${CATEGORY}.tar.xz" "${MVTEC_URL}" >&2 \
            && tar -xJf "${dest}/${CATEGORY}.tar.xz" -C "${dest}" && has_category "${dest}"; then
        rm -f "${dest}/${CATEGORY}.tar.xz"
        echo "${dest}"
    fi
}

# A local MVTec AD root holding bottle, or the download; empty when there is neither.
function find_mvtec(){
    if [ -n "${TIPC_MVTEC_DIR}" ]; then
        echo "${TIPC_MVTEC_DIR}"
    elif [ "$1" = "lite" ] && has_category "${SHARED}/data/mvtec_lite"; then
        echo "${SHARED}/data/mvtec_lite"
    elif [ "$1" = "lite" ] && has_category "${BUNDLED_DATA}"; then
        echo "${BUNDLED_DATA}"
    else
        download_mvtec
    fi
}

# copy_subset SRC_ROOT DST_ROOT N_TEST: LITE_TRAIN evenly spaced train images (the lite set spans
# the whole train set) and the first N_TEST images of every test folder (all: every image), with masks.
function copy_subset(){
    local src=$1/${CATEGORY}
    local dst=$2/${CATEGORY}
    local n_test=$3
    mkdir -p "${dst}/train/good"
    local files=($(ls "${src}/train/good"))
    local count=${#files[@]}
    local n=$(( count < LITE_TRAIN ? count : LITE_TRAIN ))
    local i
    for ((i = 0; i < n; i++)); do
        cp "${src}/train/good/${files[$((i * count / n))]}" "${dst}/train/good/"
    done
    local defect
    for defect in $(ls "${src}/test"); do
        mkdir -p "${dst}/test/${defect}"
        files=($(ls "${src}/test/${defect}"))
        [ "${n_test}" = "all" ] || files=("${files[@]:0:${n_test}}")
        for f in "${files[@]}"; do
            cp "${src}/test/${defect}/${f}" "${dst}/test/${defect}/"
            if [ "${defect}" != "good" ]; then
                mkdir -p "${dst}/ground_truth/${defect}"
                cp "${src}/ground_truth/${defect}/${f%.*}_mask.png" "${dst}/ground_truth/${defect}/"
            fi
        done
    done
}

# ---------------------------------------------------------------- data
if [ -n "${TIPC_MVTEC_DIR}" ] && ! has_category "${TIPC_MVTEC_DIR}"; then
    die "TIPC_MVTEC_DIR=${TIPC_MVTEC_DIR} has no ${CATEGORY}/train/good and ${CATEGORY}/test"
fi
mkdir -p "${DATA_DIR}"
rm -rf "${DATA_DIR}/mvtec"   # another mode's set (or the link to the full one) is replaced
if [ "${MODE}" = "lite_train_lite_infer" ] || [ "${MODE}" = "lite_train_whole_infer" ]; then
    n_test=${LITE_TEST}
    [ "${MODE}" = "lite_train_whole_infer" ] && n_test=all
    src=$(find_mvtec lite)
    if [ -n "${src}" ]; then
        copy_subset "${src}" "${DATA_DIR}/mvtec" "${n_test}" || die "copying the lite set from ${src} failed"
        echo "prepare.sh: lite set from ${src} -> ${DATA_DIR}/mvtec/${CATEGORY}"
    else
        # No local copy and offline: generated data keeps the chain runnable anywhere.
        [ "${n_test}" = "all" ] && n_test=10
        ${python} test_tipc/make_synthetic_mvtec.py --out "${DATA_DIR}/mvtec" --category ${CATEGORY} \
            --n_train ${LITE_TRAIN} --n_test ${n_test} || die "generating the synthetic set failed"
    fi
else
    src=$(find_mvtec whole)
    [ -n "${src}" ] || die "${MODE} needs the full MVTec AD: set TIPC_MVTEC_DIR=/path/to/mvtec_anomaly_detection (offline, no download)"
    ln -s "$(cd "${src}" && pwd)" "${DATA_DIR}/mvtec"
    echo "prepare.sh: ${DATA_DIR}/mvtec -> ${src}"
fi

# ---------------------------------------------------------------- backbone weights
# Resolved on every run, so random weights from an offline run never outlive it.
mkdir -p "${DATA_DIR}/weights"
rm -f "${DATA_DIR}/weights/${R18_FILE}"
if [ -f "${SHARED}/weights/${R18_FILE}" ]; then
    cp "${SHARED}/weights/${R18_FILE}" "${DATA_DIR}/weights/${R18_FILE}"
elif [ -f "./weights/${R18_FILE}" ]; then
    cp "./weights/${R18_FILE}" "${DATA_DIR}/weights/${R18_FILE}"
elif curl -sI --connect-timeout 5 --max-time 15 https://paddle-hapi.bj.bcebos.com > /dev/null 2>&1; then
    # The full official state dict; the backbone reads its stem and layer1-3.
    ${python} -c "
import shutil, sys
from paddle.utils.download import get_weights_path_from_url
from paddle.vision.models.resnet import model_urls
shutil.copy(get_weights_path_from_url(*model_urls['resnet18']), sys.argv[1])" "${DATA_DIR}/weights/${R18_FILE}" \
        || die "downloading the ResNet-18 ImageNet weights failed"
else
    echo "prepare.sh: WARNING: no ${SHARED}/weights/${R18_FILE} and offline: using a randomly initialised" \
         "ResNet-18, so the chain runs but its scores mean nothing" >&2
    ${python} -c "
import sys, paddle
paddle.seed(0)
paddle.save(paddle.vision.models.resnet18().state_dict(), sys.argv[1])" "${DATA_DIR}/weights/${R18_FILE}" \
        || die "writing random ResNet-18 weights failed"
fi
echo "prepare.sh: backbone weights ${DATA_DIR}/weights/${R18_FILE}"

# ---------------------------------------------------------------- EfficientAD teacher
# (whole_infer with a trained model in place needs none: export and inference use the model alone)
if [ "${model_name}" = "EfficientAD" ] && ! { [ "${MODE}" = "whole_infer" ] && [ -f "${train_model}" ]; }; then
    rm -f "${TEACHER}" "${TEACHER}.ckpt"
    if [ -n "${TIPC_TEACHER_WEIGHTS}" ]; then
        cp "${TIPC_TEACHER_WEIGHTS}" "${TEACHER}" || die "cannot copy TIPC_TEACHER_WEIGHTS=${TIPC_TEACHER_WEIGHTS}"
    elif [[ "${MODE}" = lite_* ]]; then
        # The teacher is EfficientAD's pretrained part. For the lite chain it only has to exist:
        # a few distillation steps on the lite images, redone on every run so that it never
        # stands in for a real teacher in a whole mode.
        ${python} train.py --method efficientad --distill --distill_data "${DATA_DIR}/mvtec/${CATEGORY}/train/good" \
            --backbone_weights "${DATA_DIR}/weights/${R18_FILE}" --teacher_weights "${TEACHER}" \
            --train_steps ${LITE_DISTILL_STEPS} --no_progress || die "distilling the lite EfficientAD teacher failed"
        rm -f "${TEACHER}.ckpt"   # the distillation's resume point, not needed once it finished
    else
        die "${MODE} needs a distilled EfficientAD teacher: TIPC_TEACHER_WEIGHTS=PATH (written by train.py --method efficientad --distill --distill_data IMAGENET_DIR --backbone_weights ...)"
    fi
    echo "prepare.sh: EfficientAD teacher ${TEACHER}"
fi

# ---------------------------------------------------------------- whole_infer: a trained model
if [ "${MODE}" = "whole_infer" ] && [ "${train_model}" != "null" ] && [ ! -f "${train_model}" ]; then
    # There is no hosted trained model: fit the one whole_train_whole_infer would train.
    set_epoch=$(func_set_params "${epoch_key}" "$(func_parser_params "${lines[6]}" whole_train_whole_infer)")
    set_batchsize=$(func_set_params "${train_batch_key}" "$(func_parser_params "${lines[8]}" whole_train_whole_infer)")
    set_pretrain=$(func_set_params "${pretrain_model_key}" "${pretrain_model_value}")
    IFS=$' \t\n'
    cmd="${python} ${norm_trainer} ${set_pretrain} ${set_epoch} ${set_batchsize} --save_path=$(dirname "${train_model}")"
    echo "prepare.sh: ${cmd}"
    eval "${cmd}" || die "fitting ${train_model} failed"
fi
exit 0
