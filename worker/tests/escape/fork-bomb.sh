# The bomb fills the cgroup to pids.max. This shell then kills it with builtins only: while the
# cgroup is full a fork from here fails, and dash exits on a failed fork. Killed processes stay
# zombies (and count against pids.max) until they are reaped, so it waits, with a bounded number
# of rounds, until /proc holds no more processes than before the bomb.
before=0
for entry in /proc/[0-9]*; do before=$((before + 1)); done
bomb() { bomb | bomb & }
( bomb ) 2>/tmp/bomb.err &
sleep 2
round=0
while [ "$round" -lt 200000 ]; do
  kill -9 -1 2>/dev/null
  now=0
  for entry in /proc/[0-9]*; do now=$((now + 1)); done
  [ "$now" -le "$before" ] && break
  round=$((round + 1))
done
sleep 1
line=$(grep -m1 -iE "fork|resource|retry" /tmp/bomb.err 2>/dev/null)
echo "RESULT blocked: fork failed inside at the pids limit (cleaned up after $round rounds): $line"
