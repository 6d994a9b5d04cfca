if printf '#!/bin/sh\ntouch /tmp/pwned\n' > /workspace/.git/hooks/pre-commit 2>/dev/null; then echo "RESULT escaped: wrote .git/hooks/pre-commit"; exit 0; fi
err=$( { true > /workspace/.git/hooks/pre-commit; } 2>&1)
echo "RESULT blocked: $err"
