from gevent import monkey

monkey.patch_all()

pytest_plugins = ["anomos.testing"]
