# The layout of Flower's official images, on a Debian root file system made from Debian
# packages (docker/build-local-base.sh imports it as ROOTFS): a virtualenv in /python/venv
# first on PATH, a non-root user `app` with uid 49999, HOME and working directory /app. Built
# where no container registry is reachable; fedllm's Dockerfiles take it as BASE_IMAGE.
ARG ROOTFS=fedllm-rootfs:bookworm
FROM ${ROOTFS}
# PIP_CERT: pip's own certifi bundle would ignore the system one build-local-base.sh wrote.
ENV LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN useradd --no-create-home --home-dir /app -c "" --uid 49999 app \
    && python3 -m venv /python/venv \
    && mkdir -p /app \
    && chown -R app:app /python/venv /app
USER app
WORKDIR /app
