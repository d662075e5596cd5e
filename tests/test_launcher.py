"""tests/launcher.py, which the command-line tests use instead of starting Python each time: a
forked child sees what `python SCRIPT ARGS` would see and ends as it would end."""
import os
import signal
import subprocess
import sys
import textwrap

import launcher
import pytest

pytestmark = pytest.mark.slow  # starts Python, and the launcher

SCRIPT = textwrap.dedent('''
    import json, os, sys
    print(json.dumps({'argv': sys.argv, 'path0': sys.path[0], 'cwd': os.getcwd(),
                      'env': os.environ.get('LAUNCHER_TEST'), 'stdin': sys.stdin.read(),
                      'main': __name__}))
    print('to stderr', file=sys.stderr)
    how = sys.argv[1]
    if how == 'message':
        sys.exit('error: a message')
    if how == 'raise':
        raise KeyError('boom')
    sys.exit(int(how))
''')


@pytest.mark.parametrize('how', ['0', '3', 'message', 'raise'])
def test_a_child_sees_and_ends_as_python_script_would(tmp_path, how):
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT)
    env = {'LAUNCHER_TEST': 'yes'}
    forked = launcher.run(script, how, 'x y', cwd=tmp_path, env=env)
    real = subprocess.run([sys.executable, str(script), how, 'x y'], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, **env},
                          stdin=subprocess.DEVNULL)
    assert forked.returncode == real.returncode == (int(how) if how.isdigit() else 1)
    assert forked.stdout == real.stdout and '"env": "yes"' in real.stdout
    assert forked.stderr == real.stderr


def test_a_child_can_be_killed_and_timed_out(tmp_path):
    script = tmp_path / 'sleep.py'
    script.write_text('import time\ntime.sleep(60)\n')
    child = launcher.start(script)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.5)
    assert child.kill() == -signal.SIGKILL
    script.write_text('print("next")\n')
    assert launcher.run(script).stdout == 'next\n'  # the server goes on
