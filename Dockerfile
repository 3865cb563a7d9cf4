# syntax=docker/dockerfile:1
# One image for every overparam process: the API, the migration, the dispatcher, the Ray head
# and the Ray workers. Ray refuses nodes whose Ray or Python version differ, down to the Python
# patch release, so every node of a cluster runs this same image (same tag, same digest).
#
#   docker build -t overparam:latest .                          # CUDA build of torch (default)
#   docker build -t overparam:cpu --build-arg TORCH_VARIANT=cpu .
#
# docker-compose.yml picks each container's command. The image's own CMD is the one-command
# service (API + embedded dispatcher + a local Ray, SQLite under /var/lib/overparam):
#   docker run --rm -p 127.0.0.1:8000:8000 --shm-size=2g overparam:cpu

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with torch, the pinned dependencies and both distributions ------
FROM ${PYTHON_IMAGE} AS build

# cuda: torch 2.13.0 from PyPI (bundles the CUDA runtime; the host needs only the driver).
# cpu:  torch 2.13.0 from PyTorch's CPU index (a few hundred MB instead of several GB).
ARG TORCH_VARIANT=cuda
# Where the CPU build comes from, for a build host that cannot reach PyTorch's index: a mirror
# of it, or (TORCH_CPU_INDEX empty) pip's default index plus a wheelhouse that holds the
# torch-2.13.0+cpu wheel, named by PIP_FIND_LINKS (pip reads it from the environment, where
# build args are). tests/deploy/test_compose_up.py builds this way.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN case "$TORCH_VARIANT" in \
      cuda) pip install "torch==2.13.0" ;; \
      cpu)  pip install "torch==2.13.0" ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"} ;; \
      *)    echo "TORCH_VARIANT must be cuda or cpu, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac \
 && python -c "import torch; assert (torch.version.cuda is not None) == ('$TORCH_VARIANT' == 'cuda'), 'torch ' + torch.__version__ + ' is not a $TORCH_VARIANT build'"

# The dependencies alone first (from the two pyproject.toml files: the client's, client/, and
# the server's, which pins ray[default] to 2.60.*), so a source change does not reinstall Ray;
# torch is already there and satisfies its range. The server's requirement on the client
# (overparam==…) is left out here: the client is installed from /src/client below.
COPY pyproject.toml /src/
COPY client/pyproject.toml /src/client/
RUN python -c "import tomllib; files = ('/src/client/pyproject.toml', '/src/pyproject.toml'); deps = [d for f in files for d in tomllib.load(open(f, 'rb'))['project']['dependencies']]; print('\n'.join(d for d in deps if not d.startswith('overparam=')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY README.md /src/
COPY api /src/api
COPY services /src/services
COPY worker /src/worker
COPY client /src/client
COPY migrations /src/migrations
# the client (distribution overparam: package overparam, the `overparam` command), then the
# server (overparam-server: api, services, worker, migrations)
RUN pip install --no-deps /src/client \
 && pip install --no-deps /src \
 && python -c "import sys, ray, torch, overparam, api.main; assert sys.version_info[:2] == (3, 11), sys.version; assert ray.__version__.startswith('2.60.'), ray.__version__; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# ---- runtime: the virtualenv on a clean base, run as an unprivileged user --------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cuda
# The source commit for run manifests (the image has no git): --build-arg GIT_COMMIT=$(git rev-parse HEAD)
ARG GIT_COMMIT=""
LABEL org.opencontainers.image.title="overparam" \
      org.opencontainers.image.description="Over-parameterization sweeps on Ray: API, dispatcher, Ray head and workers" \
      io.overparam.torch-variant="${TORCH_VARIANT}"

RUN groupadd --system --gid 10001 overparam \
 && useradd --system --uid 10001 --gid overparam --create-home --home-dir /home/overparam overparam \
 && mkdir -p /app /var/lib/overparam/checkpoints \
 && chown -R overparam:overparam /app /var/lib/overparam

COPY --from=build /opt/venv /opt/venv

# /var/lib/overparam/checkpoints exists (owned by the user) so a named volume mounted there
# starts out writable by it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OVERPARAM_DATA_DIR=/var/lib/overparam \
    OVERPARAM_CHECKPOINT_DIR=/var/lib/overparam/checkpoints \
    OVERPARAM_GIT_COMMIT=${GIT_COMMIT}

WORKDIR /app
USER 10001:10001

EXPOSE 8000
# The API's readiness (database, and Ray when it dispatches). compose gives the Ray services
# their own checks and turns it off for the migration and the dispatcher.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=5)"]

CMD ["overparam", "serve", "--host", "0.0.0.0", "--port", "8000"]
