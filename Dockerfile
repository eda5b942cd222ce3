# The pipeline image: TFX 1.16's image with this project and exactly its locked dependencies.
#
#   docker build -t recommender-pipeline:latest .
#   docker tag recommender-pipeline:latest REGISTRY/recommender-pipeline:TAG
#   docker push REGISTRY/recommender-pipeline:TAG
#   python pipeline.py compile --target kubeflow --image REGISTRY/recommender-pipeline:TAG ...
#
# Every Kubeflow step runs in it (the compiled spec's command is
# `python -m tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor`), and the
# dataflow / flink / spark Beam presets (runners/beam.py) start their SDK workers from
# it: the entrypoint stays the base image's Beam boot.

# Beam's worker boot must match the apache-beam version the lock installs (tests/test_docker.py).
ARG BEAM_VERSION=2.74.0
FROM apache/beam_python3.10_sdk:${BEAM_VERSION} AS beam

FROM tensorflow/tfx:1.16.0
COPY --from=beam /opt/apache/beam /opt/apache/beam

# The lock is installed into a venv of the image's Python (3.10, which TFX 1.16 needs), the way
# `make` installs .venv: the image's own packages are other versions, and conda-installed ones
# cannot always be uninstalled by pip.
RUN python -c "import sys; assert sys.version_info[:2] == (3, 10), sys.version" && \
    python -m venv /opt/venv && \
    /opt/venv/bin/pip install --no-cache-dir uv==0.13.9
# `pip` tells Beam's boot which pip installs staged packages (--setup_file) on workers.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    pip=/opt/venv/bin/pip \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PYTHONHASHSEED=0

# runners/beam.py CONTAINER_REPO: the compiled spec's --setup_file is /pipeline/setup.py.
WORKDIR /pipeline
COPY requirements.lock ./
RUN uv pip sync --no-cache --python /opt/venv/bin/python requirements.lock

COPY setup.py configs.py pipeline.py ./
COPY contract/ contract/
COPY servable/ servable/
COPY trainers/ trainers/
COPY compression/ compression/
COPY evaluation/ evaluation/
COPY components/ components/
COPY runners/ runners/
COPY serving/ serving/
# The bundled sample, so that `docker run IMAGE python pipeline.py run` works as a smoke test.
COPY data/ data/
RUN uv pip install --no-cache --python /opt/venv/bin/python --no-deps -e . && \
    python -c "import pipeline, trainers.model, trainers.transform"
