"""Deploy the multi-adapter OpenAI endpoint on the cluster's Ray Serve, then exit.

    ray job submit --working-dir . -- python -m ray_jobs.serve --config default \
        serve.host=0.0.0.0 'serve.adapter_dirs=[/mnt/shared/runs/*/adapters]'

Serve applications outlive the job that deployed them; `serve status` watches them
and `serve shutdown` removes them. The application is the one `RayService` and
`serve run` build (`selfspec.serving.app:app_builder`). SELFSPEC_API_KEY (in the
job's `--runtime-env-json` env_vars) sets the client key when the config has none.
"""

import sys

from ray_jobs._entry import main


def deploy(config, args) -> int:
    from ray import serve

    from selfspec.serving.app import APP_NAME, build_app, warn_if_exposed, with_env_api_key

    config = with_env_api_key(config)
    warn_if_exposed(config.serve)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    print(f"[ray_jobs.serve] application '{APP_NAME}' running at http://{config.serve.host}:{config.serve.port}/v1")
    return 0


if __name__ == "__main__":
    sys.exit(main("serve", run=deploy))
