from sap.cli import main

main()
