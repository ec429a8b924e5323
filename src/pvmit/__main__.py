from pvmit.cli.app import main

main()
