#!/usr/bin/env bash
# Build (and with --push, push) the CPU image and the CUDA worker image from deploy/docker/Dockerfile
# with docker buildx: multi-arch where a lock file exists for the architecture, an SBOM and
# provenance attestation attached to each, and the pushed digests printed as the chart's values
# (image.digest, image.cudaDigest). CI can run it as is (a runner with docker buildx, or podman's
# `docker` shim: DOCKER=podman builds one architecture without attestations).
#   $REPOSITORY:$VERSION        CPU: services, CPU worker pools, the launcher's CPU Jobs
#   $REPOSITORY:$VERSION-cuda   CUDA: GPU worker pools (image.cudaTagSuffix); nodes need NVIDIA driver >= 580
# Usage: scripts/build-images.sh [--push]
#   REPOSITORY (default ghcr.io/influence/influence), VERSION (default: the chart's appVersion),
#   PLATFORMS (default: every linux/ARCH with a deploy/docker/requirements-FLAVOR-ARCH.lock),
#   BASE_IMAGE (default: the Dockerfile's exact tag; NAME@sha256:DIGEST pins it by digest),
#   CUDA_INDEX (default cu130), DOCKER (default docker). Lock files: scripts/lock-images.py.
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

platforms_of() {  # the linux/ARCH list with a lock file for FLAVOR
  local flavor="$1" found=()
  for lock in "$root"/deploy/docker/requirements-"$flavor"-*.lock; do
    [ -e "$lock" ] || continue
    arch="${lock##*-}"; found+=("linux/${arch%.lock}")
  done
  [ "${#found[@]}" -gt 0 ] || { echo "no lock file for $flavor: run scripts/lock-images.py${flavor/cpu/}" >&2; exit 2; }
  local IFS=,; echo "${found[*]}"
}

build() {  # build TAG FLAVOR TORCH_INDEX
  local tag="$1" flavor="$2" index="$3" platforms="${PLATFORMS:-$(platforms_of "$2")}"
  local output=(--load) metadata
  metadata="$(mktemp)"
  [ "$push" = 1 ] && output=(--push)
  if [ "$docker" = podman ]; then
    "$docker" build "${base_args[@]}" --build-arg "FLAVOR=$flavor" --build-arg "TORCH_INDEX=$index" \
      -f "$root/deploy/docker/Dockerfile" -t "$tag" "$root"
    [ "$push" = 1 ] && "$docker" push "$tag"
    return 0
  fi
  "$docker" buildx build "${base_args[@]}" --platform "$platforms" \
    --build-arg "FLAVOR=$flavor" --build-arg "TORCH_INDEX=$index" \
    --sbom=true --provenance=mode=max --metadata-file "$metadata" "${output[@]}" \
    -f "$root/deploy/docker/Dockerfile" -t "$tag" "$root"
  digest="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("containerimage.digest", ""))' "$metadata")"
  echo "$tag ($platforms) digest: ${digest:-unknown (not pushed)}"
  [ "$flavor" = cpu ] && cpu_digest="$digest" || cuda_digest="$digest"
}

cpu_digest="" cuda_digest=""
build "$repository:$version" cpu "https://download.pytorch.org/whl/cpu"
build "$repository:$version-cuda" cuda "$cuda_index"
echo "chart values: --set image.tag=$version${cpu_digest:+ --set image.digest=$cpu_digest}${cuda_digest:+ --set image.cudaDigest=$cuda_digest}"
