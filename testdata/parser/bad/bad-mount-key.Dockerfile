FROM busybox
RUN --mount=type=cache,tagret=/root/.cache \
    make
