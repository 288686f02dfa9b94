from commer.service.cli import main

main()
