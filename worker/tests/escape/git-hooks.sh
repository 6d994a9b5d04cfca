if printf '#!/bin/sh\ntouch /tmp/pwned\n' > /workspace/.git/hooks/pre-commit 2>/dev/null; then echo "RESULT escaped: wrote .git/hooks/pre-commit"; exit 0; fi
if mkdir /workspace/.git/hooks-new 2>/dev/null; then echo "RESULT escaped: created a directory in .git"; exit 0; fi
err=$( { true > /workspace/.git/hooks/pre-commit; } 2>&1)
err2=$(mkdir /workspace/.git/hooks-new 2>&1)
echo "RESULT blocked: $err; $err2"
