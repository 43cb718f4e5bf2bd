#!/bin/sh
# The preemption notice, passed on to the trials: SIGTERM to this node's Ray training processes, which then save
# an in-stage checkpoint at their next optimizer step and stop (misalign.preemption; tested in
# tests/workflows/test_autoscaling.py). The study retries the cell on another node from that checkpoint, and counts it as a
# preemption, not a failure. Without the notice a reclaimed node loses up to checkpoint_every steps.
#
#   spot-notice.sh now         send it (a Kubernetes preStop hook, a drain script)
#   spot-notice.sh watch-ec2   on an EC2 spot instance: poll the instance metadata for the two-minute
#                              interruption notice, then send it (cluster.yaml starts this on every worker;
#                              it exits at once on an on-demand instance)
set -u
notify() {
    # Tune's trial processes (one-worker trials) and Ray Train's workers (multi-worker trials)
    pkill -TERM -f 'ray::(ImplicitFunc|RayTrainWorker)' || true
}
imds() {  # IMDSv2: a session token, then the path
    token=$(curl -sf -m 2 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" \
        http://169.254.169.254/latest/api/token) || return 1
    curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}
case "${1:-}" in
    now) notify ;;
    watch-ec2)
        [ "$(imds instance-life-cycle)" = spot ] || exit 0
        # 404 until AWS schedules the interruption; then {"action": "terminate", "time": ...}
        until imds spot/instance-action > /dev/null; do sleep 5; done
        echo "$(date -u +%FT%TZ) spot interruption notice: SIGTERM to the training processes"
        notify ;;
    *) echo "usage: $0 now|watch-ec2" >&2; exit 2 ;;
esac
