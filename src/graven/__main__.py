from graven.cli.entry import main

main()
