# shellcheck shell=bash
# The KubeRay release the tests run against. Its CRDs (kuberay-crds.sh) and its operator
# (build-kuberay-operator.sh) must come from the same one, so the pin is kept here, once.
# shellcheck disable=SC2034  # used by the scripts that source this
KUBERAY_VERSION=v1.5.0
# shellcheck disable=SC2034
KUBERAY_MODULE=github.com/ray-project/kuberay/ray-operator
