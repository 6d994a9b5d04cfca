if ! command -v bwrap >/dev/null; then echo "RESULT blocked: no bwrap in the sandbox"; exit 0; fi
if err=$(bwrap --ro-bind / / true 2>&1); then echo "RESULT escaped: nested bwrap ran"; exit 0; fi
echo "RESULT blocked: bwrap: $err"
