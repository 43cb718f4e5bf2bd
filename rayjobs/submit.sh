#!/usr/bin/env bash
# Submit the misalign study to a running Ray cluster as a Ray job (see rayjobs/README.md).
#
# The job runs `misalign study run CONFIG --address auto --storage STORAGE` on the cluster's head, with this
# repository as its working directory and rayjobs/runtime_env.yaml as its runtime environment. Submitting the
# same command again resumes the study from STORAGE.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: rayjobs/submit.sh [--no-wait] [--dry-run] [--env NAME]... CONFIG [STORAGE [ADDRESS]] [-- STUDY_ARGS...]

Submit `misalign study run CONFIG --address auto --storage STORAGE [STUDY_ARGS...]` as a Ray job.

  CONFIG     study config inside this repository, e.g. configs/study-paper.yaml
  STORAGE    the parent of the study's directory: an object-store URL every node can reach
             (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, any scheme:// that pyarrow or fsspec knows) or an
             absolute path every node mounts (EFS, NFS); results go to STORAGE/<study name>. Default:
             $MISALIGN_STORAGE, the value cluster.yaml sets on the nodes (export it in your shell too)
  ADDRESS    the cluster's dashboard (default http://127.0.0.1:8265, the SSH tunnel that
             `ray dashboard cluster.yaml` keeps open)
  --env NAME forward this shell's variable NAME to the job (repeatable): OPENAI_API_KEY for the http
             judge, HF_TOKEN for gated models. Ray keeps it with the job: whoever holds the cluster's
             token can read it. Never storage credentials: the nodes use their instance role.
  --no-wait  return once the job is submitted instead of streaming its logs until it ends
  --dry-run  print the ray job submit command (and, with --env, the runtime env, values hidden)
             instead of running it
  -h, --help this message

Token authentication: the cluster's token is read from RAY_AUTH_TOKEN, or else from the file
RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token, the file cluster.yaml copies to every node).
EOF
}

die() {
  echo "submit.sh: $*" >&2
  exit 2
}

no_wait=0
dry_run=0
forward=()
positional=()
study_args=()
while (($# > 0)); do
  case "$1" in
    --no-wait) no_wait=1 ;;
    --dry-run) dry_run=1 ;;
    --env)
      (($# > 1)) || die "--env needs a variable name"
      forward+=("$2")
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      study_args=("$@")
      break
      ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) positional+=("$1") ;;
  esac
  shift
done

if ((${#positional[@]} < 1 || ${#positional[@]} > 3)); then
  usage >&2
  exit 2
fi
config="${positional[0]}"
storage="${positional[1]:-${MISALIGN_STORAGE:-}}"
address="${positional[2]:-http://127.0.0.1:8265}"

# The job sees this repository only (uploaded as its working directory), so CONFIG must be a file inside it;
# it is passed to the job relative to the repository root.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
[[ -f "$config" ]] || die "no config file at $config"
config_abs="$(cd "$(dirname "$config")" && pwd -P)/$(basename "$config")"
case "$config_abs" in
  "$repo_root"/*) config_rel="${config_abs#"$repo_root"/}" ;;
  *) die "$config is outside this repository ($repo_root); only the repository is uploaded to the cluster" ;;
esac

# An object-store URL (scheme://...) or an absolute path; a relative path would be relative to the job's private
# copy of the working directory on the head.
[[ -n "$storage" ]] || die "no STORAGE: give it after CONFIG, or set MISALIGN_STORAGE" \
  "(s3://BUCKET/PREFIX, the value of cluster.yaml; or an absolute path every node mounts)"
if [[ "$storage" =~ ^[A-Za-z][A-Za-z0-9+.-]*://. ]]; then
  case "$storage" in
    file://*) [[ "${storage#file://}" == /* ]] || die "STORAGE $storage: a file:// URL needs an absolute path" ;;
  esac
else
  case "$storage" in
    /*) ;;
    *) die "STORAGE must be an object-store URL (s3://BUCKET/PREFIX, gs://...) or an absolute path on storage" \
      "every node mounts (got $storage)" ;;
  esac
fi
case "$storage" in
  *REPLACE_ME*) die "STORAGE $storage is the placeholder: set your bucket (as in cluster.yaml)" ;;
esac

# Ray 2.60 clusters require token authentication; the client must send the cluster's token.
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  [[ -s "$token_file" ]] || die "no Ray auth token: set RAY_AUTH_TOKEN, or put the cluster's token in $token_file" \
    "(the file 'ray get-auth-token --generate' writes and cluster.yaml copies to every node)"
fi
export RAY_AUTH_MODE=token

cd "$repo_root"

# With --env: a private copy of the runtime env with the variables appended to its env_vars (its last key),
# removed when this script exits.
runtime_env=rayjobs/runtime_env.yaml
if ((${#forward[@]} > 0)); then
  runtime_env="$(mktemp "${TMPDIR:-/tmp}/misalign-runtime-env.XXXXXX")"
  trap 'rm -f "$runtime_env"' EXIT
  cat rayjobs/runtime_env.yaml > "$runtime_env"
  for name in "${forward[@]}"; do
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env $name: not a variable name"
    case "$name" in
      AWS_ACCESS_KEY_ID | AWS_SECRET_ACCESS_KEY | AWS_SESSION_TOKEN | GOOGLE_APPLICATION_CREDENTIALS)
        die "--env $name: storage credentials never go into the job; the nodes reach the bucket with their" \
          "instance role (cluster.yaml) or service account (rayjob.yaml)"
        ;;
    esac
    value="${!name-}"
    [[ -n "$value" ]] || die "--env $name: $name is not set in this shell"
    [[ "$value" =~ ^[A-Za-z0-9._~+/=:@-]+$ ]] || die "--env $name: its value has characters this script does not quote"
    if ((dry_run)); then value="<hidden>"; fi
    printf '  %s: "%s"\n' "$name" "$value" >> "$runtime_env"
  done
fi

cmd=(ray job submit --address "$address" --working-dir . --runtime-env "$runtime_env")
if ((no_wait)); then cmd+=(--no-wait); fi
cmd+=(-- misalign study run "$config_rel" --address auto --storage "$storage")
# (tested lengths, not "${arr[@]}" of an empty array: that is an error under set -u in macOS's bash 3.2)
if ((${#study_args[@]} > 0)); then cmd+=("${study_args[@]}"); fi

if ((dry_run)); then
  printf '%q' "${cmd[0]}"
  printf ' %q' "${cmd[@]:1}"
  printf '\n'
  if ((${#forward[@]} > 0)); then
    printf '# %s:\n' "$runtime_env"
    cat "$runtime_env"
  fi
  exit 0
fi
command -v ray > /dev/null || die "the ray CLI is not on PATH (install this project with its study extra: pip install -e '.[study]')"
"${cmd[@]}"
