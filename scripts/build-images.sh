#!/usr/bin/env bash
# Build the CPU image and the CUDA worker image from deploy/docker/Dockerfile (needs docker with
# BuildKit, or podman). The tags are the ones the chart deploys by default:
#   $REPOSITORY:$VERSION        CPU: services, CPU worker pools, the launcher's CPU Jobs
#   $REPOSITORY:$VERSION-cuda   CUDA: GPU worker pools (image.cudaTagSuffix in the chart)
# Usage: scripts/build-images.sh [--push]
#   REPOSITORY (default ghcr.io/influence/influence), VERSION (default: the chart's appVersion),
#   BASE_IMAGE (default: the Dockerfile's exact tag; set NAME@sha256:DIGEST to pin by digest),
#   CUDA_INDEX (default cu130), DOCKER (default docker).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="$root/deploy/helm/influence/Chart.yaml"
repository="${REPOSITORY:-ghcr.io/influence/influence}"
version="${VERSION:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$chart")}"
docker="${DOCKER:-docker}"
cuda_index="${CUDA_INDEX:-https://download.pytorch.org/whl/cu130}"
push=0
[ "${1:-}" = "--push" ] && push=1
base_args=()
[ -n "${BASE_IMAGE:-}" ] && base_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

build() {  # build TAG TORCH_INDEX
  "$docker" build "${base_args[@]}" --build-arg "TORCH_INDEX=$2" \
    -f "$root/deploy/docker/Dockerfile" -t "$1" "$root"
  [ "$push" = 1 ] && "$docker" push "$1"
  return 0
}

build "$repository:$version" "https://download.pytorch.org/whl/cpu"
build "$repository:$version-cuda" "$cuda_index"
echo "built $repository:$version and $repository:$version-cuda"
