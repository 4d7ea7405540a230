# Sourced by the other scripts as `. scripts/_venv.sh serve` or `. scripts/_venv.sh test`: make .venv and
# install into it, when missing or stale, what that needs: AETR (serve), or AETR and the test tools (test),
# at the versions constraints.txt names. Each says what it is doing, as the first install takes a while.
venv_for="${1:?say what the environment is for: serve or test}"
venv_say() { echo "aetr: $*" >&2; }
venv_fresh() { [ -f "$1" ] && [ "$1" -nt pyproject.toml ] && [ "$1" -nt constraints.txt ]; }

serve_stamp=.venv/.aetr-serve-installed
test_stamp=.venv/.aetr-test-installed  # the test tools come with everything serving needs
if [ "$venv_for" = test ]; then
  stamp=$test_stamp extras='[test]'
  needs="AETR, its test tools and the $(grep -c '==' constraints.txt) packages they need"
else
  stamp=$serve_stamp extras=''
  needs="AETR and the $(sed -n '/^# serving$/,/^# testing$/p' constraints.txt | grep -c '==') packages it needs"
fi
if ! venv_fresh "$stamp" && ! { [ "$venv_for" = serve ] && venv_fresh "$test_stamp"; }; then
  if [ ! -x .venv/bin/python ]; then
    venv_say "creating the virtual environment .venv"
    python3 -m venv .venv
  fi
  venv_say "installing $needs into .venv (about a minute the first time)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".$extras"
  touch "$stamp"
fi
