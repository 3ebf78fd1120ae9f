from blip2.cli import main

main()
