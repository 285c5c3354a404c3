# One image for every kvpilot component; the command picks (kvpilot agent|gateway|controller|...).
# Torch is left out unless asked for: docker build --build-arg WITH_TORCH=1 .
ARG PYTHON=python:3.11-slim-bookworm

FROM ${PYTHON} AS build
ARG WITH_TORCH=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/kvpilot
COPY pyproject.toml README.md ./
COPY kvpilot ./kvpilot
COPY agent ./agent
COPY gateway ./gateway
COPY controller ./controller
COPY modelserver ./modelserver
COPY sim ./sim
RUN if [ "$WITH_TORCH" = "1" ]; then extra='[torch]'; else extra=''; fi \
 && /opt/kvpilot/bin/pip install ".${extra}"

FROM ${PYTHON}
RUN useradd --system --uid 65532 --no-create-home kvpilot
COPY --from=build /opt/kvpilot /opt/kvpilot
ENV PATH=/opt/kvpilot/bin:$PATH PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["kvpilot"]
CMD ["--help"]
