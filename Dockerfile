# The kvpilot image: one entrypoint, `kvpilot`, for the operator, router, autoscaler and simulator.
#   docker build -t ghcr.io/kvpilot/kvpilot:0.1.0 .
# Without a registry (a rootfs from Debian's packages, packed with umoci): scripts/build-image.sh,
# which builds the same layout (/opt/kvpilot venv, uid 65532, same env and entrypoint).
#
# Runs as uid 65532 with a read-only root filesystem: nothing is written under / at run time
# (bytecode is compiled at build time; HOME, matplotlib's and Hugging Face's caches point at /tmp,
# which the chart mounts as an emptyDir).

# -- build: the wheel and a venv with it and its dependencies -----------------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY operator operator
COPY router router
COPY autoscaler autoscaler
COPY kvtransfer kvtransfer
COPY sim sim
COPY rayserve rayserve
RUN python -m venv /opt/kvpilot \
 && /opt/kvpilot/bin/pip install build \
 && /opt/kvpilot/bin/python -m build --wheel --outdir /dist . \
 && /opt/kvpilot/bin/pip uninstall -y build pyproject_hooks packaging \
 && /opt/kvpilot/bin/pip install "$(ls /dist/kvpilot-*.whl)[all]" \
 && /opt/kvpilot/bin/pip uninstall -y pip setuptools wheel \
 && /opt/kvpilot/bin/python -m compileall -q /opt/kvpilot

# -- run: the venv on a slim Python, as a non-root user --------------------------------------------
FROM python:3.11-slim-bookworm
COPY --from=build /opt/kvpilot /opt/kvpilot
RUN echo "nonroot:x:65532:65532:nonroot:/tmp:/usr/sbin/nologin" >>/etc/passwd \
 && echo "nonroot:x:65532:" >>/etc/group
ENV PATH=/opt/kvpilot/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib HF_HOME=/tmp/hf
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["kvpilot"]
CMD ["--help"]
