FROM busybox
COPPY . /app
