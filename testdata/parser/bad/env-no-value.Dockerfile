FROM busybox
ENV name
