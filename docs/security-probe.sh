#!/bin/sh
# The probe behind the table in docs/security.md: run it as a RUN step
# (COPY it in, RUN sh /security-probe.sh) in kiln, buildah or docker.
echo "== status"; grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs|Seccomp|Seccomp_filters):' /proc/self/status
echo "== fds"; ls -l /proc/$$/fd | awk 'NR>1 {print $(NF-2), $(NF-1), $NF}'
echo "== dev"; ls /dev | tr '\n' ' '; echo
echo "== mount-root-dev"; awk '$2=="/" || $2=="/dev" {print $2, $3, $4}' /proc/self/mounts | sed -E 's/lowerdir=[^ ]*//'
echo "== keys"; cat /proc/self/status >/dev/null; (cat /proc/keys 2>&1 | wc -l)
echo "== unshare"; unshare -U true 2>&1; echo "userns rc=$?"; unshare -n true 2>&1; echo "netns rc=$?"
echo "== mknod"; mknod /tmp/lp b 7 0 2>&1; echo "mknod rc=$?"; head -c 1 /tmp/lp >/dev/null 2>/tmp/err; echo "open rc=$? $(cat /tmp/err)"
echo "== masked"; for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /sys/firmware /proc/acpi /proc/scsi; do [ -e $p ] && echo "$p $(awk -v p=$p '$2==p {print $3, $4}' /proc/self/mounts)"; done
echo "== ro"; for p in /proc/sys /proc/sysrq-trigger /proc/bus /proc/fs /proc/irq; do awk -v p=$p '$2==p {print $2, $4}' /proc/self/mounts; done
