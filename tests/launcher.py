"""Commands run as a user runs them, without paying torch's import each time.

Starting Python and importing torch and torchvision takes 3-4 s of CPU here, and the suite runs
train.py and misc/'s scripts about fifty times. So one server process imports the project once
and forks a child per command. The child is a process of its own, as the command sees it: its
argv, sys.path, working folder, environment, standard streams and exit status are those of
``python SCRIPT ARGS...``, and it can be killed by its pid; only the modules it imports are
already in sys.modules. Tests that are about starting Python (imports, CuPy's absence) or about
other launchers (torchrun) start a real one instead.
"""
import atexit
import json
import os
import runpy
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Child:
    """A command started by the server; wait() or kill() it before starting the next one."""

    def __init__(self, server, args, cwd, env):
        self.server, self.args = server, args
        self.folder = Path(tempfile.mkdtemp(prefix='launch-'))
        self.pid = server.ask({'argv': [str(a) for a in args], 'cwd': str(cwd), 'env': env,
                               'out': str(self.folder / 'out'), 'err': str(self.folder / 'err')})
        self.returncode = None

    def wait(self, timeout=None):
        """The exit status; subprocess.TimeoutExpired after timeout seconds (still running)."""
        if self.returncode is None:
            if not select.select([self.server.replies], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = self.server.reply()
        return self.returncode

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def result(self, timeout=None):
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        streams = [(self.folder / name).read_text() for name in ('out', 'err')]
        shutil.rmtree(self.folder)
        return subprocess.CompletedProcess(self.args, self.returncode, *streams)


class Server:
    def __init__(self):
        # Unbuffered: a reply read must leave the next one in the pipe, where select sees it.
        self.process = subprocess.Popen([sys.executable, __file__], cwd=ROOT, bufsize=0,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.replies = self.process.stdout
        atexit.register(self.process.kill)

    def ask(self, request):
        self.process.stdin.write(json.dumps(request).encode() + b'\n')
        return self.reply()

    def reply(self):
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f'the launcher died (status {self.process.wait()})')
        return json.loads(line)


_server = None


def start(script, *args, cwd=ROOT, env=None):
    """python ROOT/script args... in cwd with os.environ updated by env: a Child."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = Server()
    return Child(_server, [str(ROOT / script), *args], cwd, {**os.environ, **(env or {})})


def run(script, *args, cwd=ROOT, env=None, timeout=300):
    """start(...) to its end: a subprocess.CompletedProcess with the exit status (-N for a
    signal) and both streams as text."""
    return start(script, *args, cwd=cwd, env=env).result(timeout)


# --- the server ------------------------------------------------------------------------------

def run_child(request):
    """In the forked child: become `python argv...` and exit with its status."""
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request['out'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request['err'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(path, flags), fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = request['argv']
    sys.path[:2] = [os.path.dirname(sys.argv[0])]  # [tests/, ROOT] -> as `python script`
    code = 1
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
        code = 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except BaseException as error:  # the traceback from the script's frame on, as Python's
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != sys.argv[0]:
            tb = tb.tb_next
        error = error.with_traceback(tb or error.__traceback__)
        sys.excepthook(type(error), error, error.__traceback__)
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve():
    sys.path.insert(1, str(ROOT))
    import fire  # noqa: F401  (what train.py and misc/ import, imported once)
    import torchvision  # noqa: F401

    import trainer  # noqa: F401
    import utils.export  # noqa: F401
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    for line in requests:
        pid = os.fork()
        if pid == 0:
            try:
                run_child(json.loads(line))
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        replies.write(json.dumps(pid).encode() + b'\n')
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps(os.waitstatus_to_exitcode(status)).encode() + b'\n')
        replies.flush()


if __name__ == '__main__':
    serve()
