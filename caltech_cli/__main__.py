from caltech_cli.cli import main

main()
