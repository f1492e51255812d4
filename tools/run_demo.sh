#!/usr/bin/env bash
# Install what the project needs (tools/setup_env.sh) and run the main job: every bundle,
# end to end, on a phantom CT, or on your CT: `bash tools/run_demo.sh path/to/ct.nii.gz`
# (a NIfTI/NRRD file or a DICOM series folder). Outputs go to outputs/demo (or --output_dir).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/setup_env.sh"
cd "$root"
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
  ct="$1"; shift
  exec ctfm-demo --ct "$ct" "$@"
fi
exec ctfm-demo "$@"
