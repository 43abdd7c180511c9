#!/usr/bin/env bash
# Create the virtual environment that runs open-unlearning's evaluator on CPU for
# benchmarks/eval_vs_open_unlearning.py.
#
# usage: benchmarks/open_unlearning_env.sh OU_CLONE [VENV]
#   OU_CLONE  a local clone of https://github.com/locuslab/open-unlearning
#   VENV      where to create the environment (default: OU_CLONE/.venv-ou)
#
# open-unlearning pins transformers 4.45 (this framework uses 5.x), so it needs its own environment.
# torch is installed first from the CPU build so that no CUDA wheels are pulled in; deepspeed is
# replaced by an import stub (nothing in the evaluation path calls it, but unlearning trainers import
# it at module level and building it needs a CUDA toolchain); bitsandbytes and tensorboard are left
# out (training only).
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1/src/eval.py" ]]; then
    echo "usage: $0 OU_CLONE [VENV]  (OU_CLONE must be an open-unlearning clone with src/eval.py)" >&2
    exit 2
fi
OU=$(cd "$1" && pwd)
VENV=${2:-$OU/.venv-ou}
PY=${PYTHON:-python3.11}
TORCH=${TORCH_VERSION:-2.13.0}

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# TORCH_INDEX: where the CPU build of torch comes from (unset: pip's configured indexes, e.g. a local wheel
# directory; online: https://download.pytorch.org/whl/cpu).
"$VENV/bin/pip" install -q "torch==$TORCH" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
"$VENV/bin/pip" install -q \
    "transformers==4.45.1" "huggingface-hub==0.29.1" "datasets==3.0.1" "accelerate==0.34.2" \
    "hydra-core==1.3" "hydra_colorlog==1.2.0" "rouge-score==0.1.2" "scipy==1.14.1" \
    "scikit-learn==1.5.2" "numpy==2.2.3" "lm-eval==0.4.8"

SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$SITE/deepspeed"
cat > "$SITE/deepspeed/__init__.py" <<'EOF'
"""Import stub for deepspeed on CPU (written by lightning-unlearn's benchmarks/open_unlearning_env.sh).

It has no package metadata, so transformers and accelerate report deepspeed as unavailable; it only
satisfies module-level imports in open-unlearning's trainers.
"""


class DeepSpeedEngine:
    pass


def initialize(*args, **kwargs):
    raise RuntimeError("deepspeed is a stub in this environment (CPU evaluation only)")
EOF
"$VENV/bin/python" -c "import transformers, torch, lm_eval, hydra, deepspeed; print('open-unlearning env ready:', '$VENV', 'torch', torch.__version__, 'transformers', transformers.__version__)"
