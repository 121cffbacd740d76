#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default: a demo of several sites end to end.
source "$(dirname "$0")/_env.sh"
exec fedscan demo --out "${FEDSCAN_DEMO_OUT:-demo-output}" "$@"
