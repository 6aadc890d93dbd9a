from mmgen_deploy.cli.app import main

main()
