# The README's install, step for step, on python:3.11-slim.
FROM python:3.11-slim

# make runs the README's commands; the TFF worker binary needs nothing more.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tff-apps
COPY . .

# README "Install": uv from pip, then the locked environment (`make install`).
RUN python3 -m pip install --quiet "uv==0.13.9" \
    && uv sync --locked --compile-bytecode

ENV PATH="/opt/tff-apps/.venv/bin:${PATH}" \
    TF_CPP_MIN_LOG_LEVEL=3
ENTRYPOINT ["tff-apps"]
CMD ["demo"]
