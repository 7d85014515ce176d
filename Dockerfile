# bpfree: a GPU image that reproduces the pipeline with `dvc repro`.
#
# Base: NVIDIA's CUDA 13 image, pinned by exact tag. It carries the driver-compatibility
# check (NVIDIA_REQUIRE_CUDA); the CUDA 13 libraries torch uses come from the lock file's
# pinned wheels (nvidia-*-cu13), so the image is the lock, not whatever the base ships.
# Ubuntu 22.04 because it ships Python 3.11 (python3.11 in jammy), the Python the lock was
# generated on (requirements.lock's header), so the image runs the interpreter the pins were
# resolved and tested for; Ubuntu 24.04 has only 3.12.
FROM nvidia/cuda:13.0.0-base-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# Fashion-MNIST ships as a Debian/Ubuntu package; without it, only its experiments lack data.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv git ca-certificates \
 && (apt-get install -y --no-install-recommends dataset-fashion-mnist \
     || echo "dataset-fashion-mnist unavailable: Fashion-MNIST runs will report missing data") \
 && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /bpfree
# The lock first, so editing code does not reinstall torch.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY . .
RUN pip install --no-deps -e .

# Provenance without .git: `docker build --build-arg BPFREE_GIT_COMMIT=$(git rev-parse HEAD)`
# records the commit in every metrics.json (bpfree.provenance.git_info).
ARG BPFREE_GIT_COMMIT=""
ENV BPFREE_GIT_COMMIT=${BPFREE_GIT_COMMIT}
# Raw data (torchvision / GLUE layouts) is mounted here; online, missing sets are downloaded.
ENV BPFREE_DATA_DIR=/data
VOLUME ["/data"]
# `bpfree repro` is `dvc repro`, switching DVC to no-SCM mode when the copy has no .git.
CMD ["bpfree", "repro"]
