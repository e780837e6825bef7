"""The quick-start app: no broker is configured, so qctl uses ./qctl.sqlite3."""
from qctl import App

app = App("tasks")


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task(bind=True, max_retries=2, default_retry_delay=0.2)
def flaky(self, n):
    """Fails on its first run, succeeds on the retry."""
    if self.request.retries == 0:
        raise self.retry(exc=RuntimeError("first try fails"))
    return f"ok after {self.request.retries} retry: {n}"
