def cli_main():
  raise NotImplementedError
