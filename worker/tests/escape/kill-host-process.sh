if err=$(kill -0 "$ESCAPE_HOST_PID" 2>&1); then echo "RESULT escaped: can signal host pid $ESCAPE_HOST_PID"; exit 0; fi
# pid 1 is bubblewrap: outside the agent's Landlock domain, so signals to it are refused too.
if err1=$(kill -0 1 2>&1); then echo "RESULT escaped: can signal pid 1 (bubblewrap)"; exit 0; fi
echo "RESULT blocked: kill $ESCAPE_HOST_PID: $err; kill 1: $err1"
