if ls -A /root 2>/dev/null | grep -q .; then echo "RESULT escaped: /root lists $(ls -A /root | head -3)"; exit 0; fi
if [ -e /root ]; then echo "RESULT blocked: /root is empty in the sandbox"; else echo "RESULT blocked: /root does not exist in the sandbox"; fi
