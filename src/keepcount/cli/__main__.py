from keepcount.cli import main

main()
