# block losses on a 3-layer SmolLM2 copy: AWQ-init 5 epochs at several lwc_lr against from scratch
# usage: PROBE_DIR=/tmp/probe bash bench/handoff_probe/probe.sh   (about 25 minutes on 2 cores; prints the last epoch loss per block)
set -u; cd "$(dirname "$0")/../.."; P=${PROBE_DIR:-/tmp/probe}; mkdir -p $P
export LLMC_DATA=${LLMC_DATA:-../shared/data}
C=configs/quantization/combination/awq_comb_omni/w3a16g64
EV="--set eval.num_samples=1 --set model.compute_dtype=bfloat16"
S="--set quant.special.clip_path=$P/state --set quant.special.scale_path=$P/state"
[ -d $P/smol3 ] || python bench/handoff_probe/make3.py $P/smol3
[ -d $P/awq ] || python -m llmc --config $C/step_1_awq.yml --set model.path=$P/smol3 $S $EV --set save.save_path=$P/awq --overwrite > $P/awq.log 2>&1
# step2 NAME CONFIG MODEL [--set ...]: one OmniQuant run; prints its block losses after the last epoch (5 or 20)
step2() { name=$1; C2=$2; M=$3; shift 3; python -m llmc --config $C2 --set model.path=$M $EV --set quant.special.deactive_amp=False --set save.save_path=$P/out_$name --overwrite "$@" > $P/$name.log 2>&1; echo "$name: $(grep -o 'epoch [0-9]*: loss [0-9.e-]*' $P/$name.log | grep -E 'epoch (4|19):' | tr '\n' ' ')"; }
run() { name=$1; shift; step2 $name $C/step_2_omniq.yml $P/awq/transformed_model $S "$@"; }
for lr in 0.01 0.02 0.05; do run awq_lr$lr --set quant.special.lwc_lr=$lr; done
for lr in 0.02 0.05; do run awqfull_lr$lr --set quant.special.lwc_lr=$lr --set quant.special.load_clip=False; done
W=configs/quantization/methods/OmniQuant/omniq_w_only.yml
scratch() { name=$1; shift; step2 $name $W $P/smol3 --set quant.weight.bit=3 "$@"; }
scratch scratch_lr0.01_5 --set quant.special.epochs=5
scratch scratch_lr0.05_5 --set quant.special.epochs=5 --set quant.special.lwc_lr=0.05
scratch scratch_lr0.01_20 --set quant.special.epochs=20
