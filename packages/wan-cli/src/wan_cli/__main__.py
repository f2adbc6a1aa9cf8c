from wan_cli.main import main

main()
