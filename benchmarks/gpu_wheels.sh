#!/usr/bin/env bash
# Everything benchmarks/gpu_session.py needs on a GPU machine without a package registry, in one folder to carry
# (default build/gpu, ignored by git): the Python 3.12 wheels it lacks and the official TD-MPC2 source at the two
# commits the session compares with. Checks that the folder fits the 64 MiB a device call may carry.
#
#   benchmarks/gpu_wheels.sh [DIR]                      # run in the repository root; needs PyPI
#   OFFICIAL=/path/to/tdmpc2-clone benchmarks/gpu_wheels.sh
#
# That machine has jax (CUDA), flax, optax, orbax, tensorboard, numpy, scipy, matplotlib and torch, but no MuJoCo
# stack. Left out: warp-lang (Playground's GPU physics, ~150 MB; MJX falls back to --impl jax without it), and
# omegaconf's antlr4-python3-runtime 4.9.3 (a source archive only): hydra-core, omegaconf and termcolor are the
# official trainer's imports, which the session never makes (it reads config.yaml itself), brought for completeness.
set -eu
dir=${1:-build/gpu}
official=${OFFICIAL:-/tmp/tdmpc2_official}  # a clone of github.com/nicklashansen/tdmpc2 (docs/fidelity.md)
limit=$((64 * 1024 * 1024))

mkdir -p "$dir/wheels"
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir/wheels" "$@"
}
# Our scripts: MuJoCo, MJX, Playground, Brax and their small dependencies (the versions pyproject.toml resolves to),
# with jaxopt, lxml and tqdm, which importing the scripts and loading an env also pulls in (not on that machine's list).
download mujoco==4.0.0 mujoco-core==4.0.0 mujoco-studio==4.0.0 glfw pyopengl mujoco-mjx==3.17.0 playground==0.2.0 \
  brax==0.14.2 ml_collections==1.1.0 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 tensorboardX==2.6.5 \
  trimesh==5.2.0 jaxopt==0.8.5 lxml==6.1.3 tqdm==4.70.1
# The official TD-MPC2: current main needs tensordict (0.8.3, the version its Docker file pins; later ones fail in
# WorldModel.to()), which needs cloudpickle, orjson, importlib_metadata; then the trainer's configuration packages.
download tensordict==0.8.3 cloudpickle==3.1.3 pyvers==0.2.3 orjson importlib_metadata zipp packaging \
  hydra-core==1.3.2 omegaconf==2.3.0 termcolor==2.4.0

# The official agent's source at b67b21c (the 2023 release) and at main: only its tdmpc2/ folder.
if git -C "$official" rev-parse --verify -q b67b21c^{commit} >/dev/null 2>&1; then
  for pair in b67b21c:official_b67b21c HEAD:official_main; do
    rm -rf "${dir:?}/${pair#*:}" && mkdir -p "$dir/${pair#*:}"
    git -C "$official" archive "${pair%%:*}" tdmpc2 | tar -x -C "$dir/${pair#*:}"
  done
  echo "official source: $dir/official_b67b21c, $dir/official_main (main at $(git -C "$official" rev-parse --short HEAD))"
else
  echo "note: no clone of nicklashansen/tdmpc2 at $official (set OFFICIAL=...): the session's official part will" \
    "be skipped" >&2
fi

size=$(du -sb "$dir" | cut -f1)
echo "$dir: $((size / 1024 / 1024)) MiB in $(find "$dir" -type f | wc -l) files"
if [ "$size" -gt "$limit" ]; then
  echo "error: $dir is larger than the 64 MiB one device call may carry" >&2
  exit 1
fi
