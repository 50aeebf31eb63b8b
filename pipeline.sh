#!/usr/bin/env bash
# The whole CPU pipeline on shapes, from nothing to prompt-following 64x64 videos and their caption accuracy:
#
#     bash pipeline.sh         # the autoregressive prior (ar)
#     bash pipeline.sh mask    # the masked prior; reuses the data, tokenizer and upsampler of an earlier run
#     bash pipeline.sh diffusion   # latent diffusion (diffusion.py) on the same tokenizer; reuses them too
#
# Each step is a plain command you can also run alone. Re-running continues: the data is reused and an
# interrupted training resumes from its last checkpoint. The prior's data holds out green triangles and
# small cyan shapes, so eval.py also measures compositional generalisation on them, and (like every shapes
# dataset) a set of phrasings, measured by the second accuracy step. The tokenizer and the
# upsampler never read a caption: they train on every combination (TOK_DATA), so they can draw them all.
# The generator makes 32x32 videos and the upsampler (superres.py) turns them into 64x64 ones. An eighth of
# the clips wrap round the canvas (--wrap 0.125), so that a story's later prompt can move its object from anywhere
# (a quarter cost the priors 1-4 points of caption accuracy: RESULTS.md).
# Extra flags per step come from the environment, e.g. PRIOR_FLAGS="--n_layer 8" bash pipeline.sh (PRIOR_FLAGS
# reach the diffusion model too);
# DATA, TOK_DATA and OUT move the data and the checkpoints (default data/shapes_holdout, data/shapes, out).
# The prior's training step is compiled (--compile: on CPU its step 1.2x as fast, after about a minute of
# compiling on a fresh machine; train.py trains eagerly if no C++ compiler is installed, and
# PRIOR_FLAGS=--no-compile turns it off).
set -euo pipefail
MODE=${1:-ar}
if [[ $MODE != ar && $MODE != mask && $MODE != diffusion ]]; then
    echo "usage: bash pipeline.sh [ar|mask|diffusion]" >&2
    exit 2
fi
DATA=${DATA:-data/shapes_holdout}
TOK_DATA=${TOK_DATA:-data/shapes}
OUT=${OUT:-out}
TOK=$OUT/pipeline_tokenizer
SR=$OUT/pipeline_superres
PRIOR=$OUT/pipeline_$MODE
SECONDS=0

step() {  # step NAME COMMAND...: run and time one step
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*"
    "$@"
    echo "== $name took $((SECONDS - start)) s (total $((SECONDS / 60)) min $((SECONDS % 60)) s)"
}
resume() {  # --resume when an earlier run of this step left a checkpoint
    if [[ -f $1/ckpt.pt ]]; then echo --resume; else echo --no-resume; fi
}

step data python prepare_data.py --out "$DATA" --holdout "green triangle,small cyan" --wrap 0.125 ${DATA_FLAGS:-}
step tokenizer_data python prepare_data.py --out "$TOK_DATA" --wrap 0.125 ${DATA_FLAGS:-}
step tokenizer python train.py --model=tokenizer --data "$TOK_DATA" --out_dir "$TOK" --max_iters 2000 \
    $(resume "$TOK") ${TOK_FLAGS:-}
step superres python train.py --model=superres --data "$TOK_DATA" --out_dir "$SR" $(resume "$SR") ${SR_FLAGS:-}
if [[ $MODE == diffusion ]]; then
    step diffusion python train.py --model=diffusion --data "$DATA" --tokenizer "$TOK/ckpt.pt" --out_dir "$PRIOR" \
        $(resume "$PRIOR") ${PRIOR_FLAGS:-}
else
    step prior python train.py --model=prior --mode=$MODE --data "$DATA" --tokenizer "$TOK/ckpt.pt" --out_dir "$PRIOR" \
        --compile $(resume "$PRIOR") ${PRIOR_FLAGS:-}
fi
step samples python sample.py --ckpt "$PRIOR/ckpt.pt" --superres "$SR/ckpt.pt" --out "$PRIOR/samples" \
    --num_samples 4 --no_mp4 \
    --prompt "a big red circle moving left" --prompt "a small blue square moving up" \
    --prompt "a big yellow cross moving right" --prompt "a small magenta triangle moving down" \
    --prompt "a big green triangle moving left" --prompt "a small cyan circle moving down" ${SAMPLE_FLAGS:-}
step accuracy python eval.py --ckpt "$PRIOR/ckpt.pt" --superres "$SR/ckpt.pt" --samples_per_prompt 1 \
    --json "$PRIOR/accuracy.json" ${EVAL_FLAGS:-}
step phrasings python eval.py --ckpt "$PRIOR/ckpt.pt" --samples_per_prompt 1 --phrasing held_out \
    --json "$PRIOR/accuracy_phrasings.json" ${EVAL_FLAGS:-}
echo "done in $((SECONDS / 60)) min $((SECONDS % 60)) s: videos in $PRIOR/samples, accuracy in $PRIOR/accuracy.json" \
    "(prompts in held-out phrasings: $PRIOR/accuracy_phrasings.json)"
