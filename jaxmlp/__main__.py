from jaxmlp.cli import run

run()
