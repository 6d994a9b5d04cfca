bomb() { bomb | bomb & }
( bomb ) 2>/tmp/bomb.err &
sleep 2
kill -9 -1 2>/dev/null
sleep 1
line=$(grep -m1 -iE "fork|resource|retry" /tmp/bomb.err 2>/dev/null)
echo "RESULT blocked: fork failed inside at the pids limit: $line"
