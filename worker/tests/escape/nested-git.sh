# A nested .git file pointing at another repository on the host (ESCAPE_OTHER_GIT): its commit
# must not leave as a gitlink. The verdict is the test's, from what reached the origin.
mkdir -p sub && printf 'gitdir: %s\n' "$ESCAPE_OTHER_GIT" > sub/.git && echo x > sub/file && echo y > top.txt && echo "RESULT submitted: a nested .git"
