#!/bin/bash
# The one parser for test_tipc/configs/*/train_infer_python.txt, sourced by prepare.sh and
# test_train_inference_python.sh. A config line is `key:value`; values hold no ':'.
#   key:a|b|c                                   a list, looped over by the chain
#   key:lite_train_lite_infer=1|whole_train_whole_infer=70000   a value per mode
#   null:null / key:null                        nothing is passed

# `bash test_tipc/SCRIPT CONFIG MODE`: checks the arguments (usage on stderr and exit 2 when
# wrong), enters the repository root (config paths are relative to it) and sets FILENAME (the
# config, absolute), MODE and lines (the config's lines: the format is positional, PaddleOCR's
# train_infer_python.txt, so line N is always the same field).
function func_tipc_setup(){
    local script=$1
    local modes="lite_train_lite_infer lite_train_whole_infer whole_infer whole_train_whole_infer"
    if [ $# -ne 3 ] || [ ! -f "$2" ] || [[ " ${modes} " != *" $3 "* ]]; then
        echo "usage: bash test_tipc/${script} CONFIG MODE  (MODE: ${modes// / | })" >&2
        exit 2
    fi
    FILENAME=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
    MODE=$3
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
    mapfile -t lines < "${FILENAME}"
}

function func_parser_key(){
    strs=$1
    IFS=":"
    array=(${strs})
    tmp=${array[0]}
    echo ${tmp}
}

function func_parser_value(){
    strs=$1
    IFS=":"
    array=(${strs})
    tmp=${array[1]}
    echo ${tmp}
}

# The value for MODE from `key:mode=value|mode=value`; empty when the line has none for MODE.
function func_parser_params(){
    strs=$1
    MODE=$2
    IFS=":"
    array=(${strs})
    tmp=${array[1]}
    IFS="|"
    for _params in ${tmp[*]}; do
        IFS="="
        array=(${_params})
        mode=${array[0]}
        value=${array[1]}
        if [[ ${mode} = ${MODE} ]]; then
            IFS="|"
            echo ${value}
            return
        fi
        IFS="|"
    done
}

# `key=value` for the command line, or a blank when the key or the value is null/empty.
function func_set_params(){
    key=$1
    value=$2
    if [ "${key}x" = "nullx" ] || [ "${key}x" = "x" ]; then
        echo " "
    elif [ "${value}" = "null" ] || [ "${value}" = " " ] || [ ${#value} -le 0 ]; then
        echo " "
    else
        echo "${key}=${value}"
    fi
}

# One line per command in results_python.log; the caller counts failures for the exit code.
function status_check(){
    last_status=$1
    run_command=$2
    run_log=$3
    if [ ${last_status} -eq 0 ]; then
        echo "Run successfully with command - ${run_command}!" | tee -a ${run_log}
    else
        echo "Run failed with command - ${run_command}!" | tee -a ${run_log}
    fi
}
