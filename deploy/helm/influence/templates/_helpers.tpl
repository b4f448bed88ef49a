{{/* Chart name, cut to 63 characters (the DNS label limit). */}}
{{- define "influence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, cut to 63; the release name alone if it already holds the chart name. */}}
{{- define "influence.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's resource name: fullname-component, still cut to 63. */}}
{{- define "influence.componentName" -}}
{{- printf "%s-%s" (include "influence.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "influence.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: only name and instance (plus app.kubernetes.io/component at each use), never anything that changes on upgrade. */}}
{{- define "influence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "influence.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "influence.labels" -}}
helm.sh/chart: {{ include "influence.chart" . }}
{{ include "influence.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: influence
{{- end }}

{{- define "influence.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "influence.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of a pod: the CPU image, or with `cuda: true` the CUDA one (tag + image.cudaTagSuffix),
pinned by digest when image.digest / image.cudaDigest is set (scripts/build-images.sh prints them);
global.imageRegistry (a parent chart's) replaces the repository's registry. */}}
{{- define "influence.image" -}}
{{- $image := .root.Values.image }}
{{- $tag := $image.tag | default .root.Chart.AppVersion }}
{{- $repository := include "influence.registry" (dict "root" .root "repository" $image.repository) }}
{{- $digest := .cuda | default false | ternary $image.cudaDigest $image.digest }}
{{- $repository }}:{{ $tag }}{{ if .cuda }}{{ $image.cudaTagSuffix }}{{ end }}{{ with $digest }}@{{ . }}{{ end }}
{{- end }}

{{/* `repository` under global.imageRegistry when a parent chart sets one (its first path part is
replaced when it names a registry: one with a dot or a colon, or localhost). */}}
{{- define "influence.registry" -}}
{{- $registry := (default dict .root.Values.global).imageRegistry }}
{{- if not $registry }}{{ .repository }}
{{- else }}
{{- $parts := splitList "/" .repository }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- printf "%s/%s" $registry (join "/" (rest $parts)) }}
{{- else }}{{ printf "%s/%s" $registry .repository }}{{ end }}
{{- end }}
{{- end }}

{{/* imagePullSecrets of every pod: the chart's and a parent chart's global ones (names or {name}). */}}
{{- define "influence.imagePullSecrets" -}}
{{- $secrets := list }}
{{- range $secret := concat .Values.imagePullSecrets (default list (default dict .Values.global).imagePullSecrets) }}
{{- $entry := kindIs "string" $secret | ternary (dict "name" $secret) $secret }}
{{- if not (has $entry $secrets) }}{{ $secrets = append $secrets $entry }}{{ end }}
{{- end }}
{{- with $secrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* How a pool autoscales: "keda", "hpa" or "" (not at all). engine auto: KEDA where the cluster
(or `helm template --api-versions`) serves keda.sh/v1alpha1, else an HPA. */}}
{{- define "influence.autoscaler" -}}
{{- $auto := .spec.autoscaling }}
{{- if $auto.enabled }}
{{- if eq $auto.engine "auto" }}{{ .root.Capabilities.APIVersions.Has "keda.sh/v1alpha1" | ternary "keda" "hpa" }}
{{- else }}{{ $auto.engine }}{{ end }}
{{- end }}
{{- end }}

{{/* A pool's scale-in wait (KEDA's cooldownPeriod and the HPA's scale-down window): its own, or 5 task leases. */}}
{{- define "influence.cooldownSeconds" -}}
{{- $cooldown := .spec.autoscaling.cooldownPeriod }}
{{- if kindIs "invalid" $cooldown }}{{ mul 5 (int .root.Values.queue.leaseSeconds) }}{{ else }}{{ int $cooldown }}{{ end }}
{{- end }}

{{/* How long a SIGTERMed worker lets its task run before handing the lease back: the grace period
less 15 s to hand it back and exit (0: the grace period is too short to wait at all). */}}
{{- define "influence.drainSeconds" -}}
{{- max 0 (sub (int .terminationGracePeriodSeconds) 15) }}
{{- end }}

{{- define "influence.grpcPorts" -}}
{{- range $port := list .Values.services.api.port .Values.services.factor.port .Values.services.gradient.port .Values.services.query.port | uniq }}
- {port: {{ $port }}, protocol: TCP}
{{- end }}
{{- end }}

{{- define "influence.queuePrefix" -}}
{{- .Values.queue.prefix | default (include "influence.fullname" .) }}
{{- end }}

{{- define "influence.redisHost" -}}
{{- include "influence.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{/* The Secret with the Redis password (in-chart Redis) or URL (external): given or made by the chart. */}}
{{- define "influence.redisSecretName" -}}
{{- .Values.redis.existingSecret | default (include "influence.componentName" (dict "root" . "component" "redis-auth")) }}
{{- end }}

{{- define "influence.redisAuth" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled }}true{{ end }}
{{- end }}

{{- define "influence.storeUrl" -}}
{{- with .Values.objectStore -}}
{{ printf "s3://%s?endpoint=%s&secure=%d&region=%s" .bucket .endpoint (ternary 1 0 .secure) .region }}
{{- end }}
{{- end }}

{{/* "true" when S3 uses static keys from a Secret; else the credential chain. */}}
{{- define "influence.staticS3Keys" -}}
{{- if or .Values.objectStore.existingSecret .Values.objectStore.accessKey }}true{{ end }}
{{- end }}

{{- define "influence.secretName" -}}
{{- default (include "influence.componentName" (dict "root" . "component" "object-store")) .Values.objectStore.existingSecret }}
{{- end }}

{{/*
`base` overlaid with `over`, as YAML: maps merge key by key (recursively), anything else in `over`
wins, false, 0 and [] included (sprig's merge would keep the base's for those).
*/}}
{{- define "influence.overlay" -}}
{{- $base := deepCopy .base }}
{{- range $key, $value := .over }}
{{- if and (kindIs "map" $value) (kindIs "map" (index $base $key)) }}
{{- $_ := set $base $key (include "influence.overlay" (dict "base" (index $base $key) "over" $value) | fromYaml) }}
{{- else }}
{{- $_ := set $base $key $value }}
{{- end }}
{{- end }}
{{- toYaml $base }}
{{- end }}

{{/* Every enabled worker pool, each overlaid on workers.defaults, as YAML {name: pool}. */}}
{{- define "influence.pools" -}}
{{- $pools := dict }}
{{- range $name, $pool := .Values.workers.pools }}
{{- $merged := include "influence.overlay" (dict "base" $.Values.workers.defaults "over" (default dict $pool)) | fromYaml }}
{{- if $merged.enabled }}
{{- $_ := set $pools $name $merged }}
{{- end }}
{{- end }}
{{- toYaml $pools }}
{{- end }}

{{/* The replicas a PDB protects: the autoscaler's minimum when one scales the workload. */}}
{{- define "influence.minReplicas" -}}
{{- $auto := default dict .autoscaling }}
{{- if $auto.enabled }}{{ int (hasKey $auto "minReplicas" | ternary $auto.minReplicas $auto.minReplicaCount) }}{{ else }}{{ int .replicaCount }}{{ end }}
{{- end }}

{{/*
Every problem with the values, reported at once by one `fail`. values.schema.json checks
types and unknown keys first; this checks what a schema cannot say well.
*/}}
{{- define "influence.validateValues" -}}
{{- $problems := list }}
{{- $redis := .Values.redis }}
{{- if and (not $redis.enabled) (not $redis.url) (not $redis.existingSecret) }}
{{- $problems = append $problems "redis: an external Redis (enabled: false) needs url or existingSecret (a Secret whose key `url` holds redis://host:port/db)" }}
{{- end }}
{{- if and $redis.url (not (regexMatch "^rediss?://" $redis.url)) }}
{{- $problems = append $problems "redis.url: must start with redis:// or rediss://" }}
{{- end }}
{{- if and $redis.enabled $redis.url }}
{{- $problems = append $problems "redis.url: only for an external Redis; set redis.enabled=false to use it" }}
{{- end }}
{{- if and $redis.auth.password (not (regexMatch "^[A-Za-z0-9_-]+$" $redis.auth.password)) }}
{{- $problems = append $problems "redis.auth.password: letters, digits, - and _ only (it is part of a redis:// URL)" }}
{{- end }}
{{- if not .Values.objectStore.endpoint }}
{{- $problems = append $problems "objectStore.endpoint: empty; set the S3 endpoint as host:port" }}
{{- else if contains "://" .Values.objectStore.endpoint }}
{{- $problems = append $problems (printf "objectStore.endpoint: %q must be host:port without a scheme (use objectStore.secure for TLS)" .Values.objectStore.endpoint) }}
{{- end }}
{{- if not .Values.objectStore.bucket }}
{{- $problems = append $problems "objectStore.bucket: empty" }}
{{- end }}
{{- if and (not .Values.objectStore.existingSecret) (ne (empty .Values.objectStore.accessKey) (empty .Values.objectStore.secretKey)) }}
{{- $problems = append $problems "objectStore: accessKey and secretKey go together (or use existingSecret, or neither for the credential chain)" }}
{{- end }}
{{- $roles := list "factor" "gradient" "query" }}
{{- range $role := $roles }}
{{- if not (or $.Values.services.api.enabled (index $.Values.services $role).enabled) }}
{{- $problems = append $problems (printf "services: nothing serves the %s API; enable services.api or services.%s" $role $role) }}
{{- end }}
{{- end }}
{{- range $role := prepend $roles "api" }}
{{- $service := index $.Values.services $role }}
{{- if and $service.enabled $service.pdb.enabled (not (contains "%" (toString $service.pdb.minAvailable))) }}
{{- $min := int (include "influence.minReplicas" $service) }}
{{- if ge (int $service.pdb.minAvailable) $min }}
{{- $problems = append $problems (printf "services.%s.pdb.minAvailable: %d must be below the replicas it protects (%d), or no node with one of them can be drained" $role (int $service.pdb.minAvailable) $min) }}
{{- end }}
{{- end }}
{{- end }}
{{- $pools := include "influence.pools" . | fromYaml }}
{{- /* The kinds whose stages never load the job's model (services' Stage.loads_model is False;
tests/services/system/test_device_pools.py keeps this list equal to the stage table's). */}}
{{- $modelFree := list "register" "eigen" "finalize" "self_merge" "index_publish" "index_score" }}
{{- $gpuKinds := dict }}
{{- range $name, $pool := $pools }}
{{- if $pool.gpu }}
{{- range $kind := $pool.kinds }}{{ $_ := set $gpuKinds $kind $name }}{{ end }}
{{- end }}
{{- end }}
{{- range $name, $pool := $pools }}
{{- $limits := default dict (default dict $pool.resources).limits }}
{{- $requests := default dict (default dict $pool.resources).requests }}
{{- if $pool.gpu }}
{{- if not (gt (int (default 0 (index $limits "nvidia.com/gpu"))) 0) }}
{{- $problems = append $problems (printf "workers.pools.%s: a GPU pool (gpu: true) needs resources.limits.nvidia.com/gpu >= 1" $name) }}
{{- else if and (hasKey $requests "nvidia.com/gpu") (ne (int (index $requests "nvidia.com/gpu")) (int (index $limits "nvidia.com/gpu"))) }}
{{- $problems = append $problems (printf "workers.pools.%s: resources.requests.nvidia.com/gpu must equal limits (or be left out)" $name) }}
{{- end }}
{{- else }}
{{- if or (hasKey $limits "nvidia.com/gpu") (hasKey $requests "nvidia.com/gpu") }}
{{- $problems = append $problems (printf "workers.pools.%s: nvidia.com/gpu resources on a pool with gpu: false; set gpu: true (or remove them with nvidia\\.com/gpu=null)" $name) }}
{{- end }}
{{- $shared := list }}
{{- range $kind := $pool.kinds }}{{ if hasKey $gpuKinds $kind }}{{ $shared = append $shared (printf "%s (GPU pool %s)" $kind (index $gpuKinds $kind)) }}{{ end }}{{ end }}
{{- if $shared }}
{{- $problems = append $problems (printf "workers.pools.%s: a CPU pool takes kinds a GPU pool takes: %s; their cuda tasks could land here. Give each kind to GPU pools or to CPU pools, not both" $name (join ", " $shared)) }}
{{- end }}
{{- $loading := list }}
{{- range $kind := $pool.kinds }}{{ if not (or (has $kind $modelFree) (hasKey $gpuKinds $kind)) }}{{ $loading = append $loading $kind }}{{ end }}{{ end }}
{{- if and $gpuKinds $loading }}
{{- $problems = append $problems (printf "workers.pools.%s: a CPU pool takes kinds that load the job's model (%s) while GPU pools exist: a job naming cuda would wait on them here. Give them to a GPU pool; CPU pools may take %s" $name (join ", " $loading) (join ", " $modelFree)) }}
{{- end }}
{{- end }}
{{- if not $pool.kinds }}
{{- $problems = append $problems (printf "workers.pools.%s: kinds is empty" $name) }}
{{- end }}
{{- if and $pool.pdb.enabled (not (contains "%" (toString $pool.pdb.minAvailable))) }}
{{- $min := int (include "influence.minReplicas" $pool) }}
{{- if ge (int $pool.pdb.minAvailable) $min }}
{{- $problems = append $problems (printf "workers.pools.%s.pdb.minAvailable: %d must be below the replicas it protects (%d), or no node with one of them can be drained" $name (int $pool.pdb.minAvailable) $min) }}
{{- end }}
{{- end }}
{{- if and $pool.autoscaling.enabled (gt (int $pool.autoscaling.minReplicaCount) (int $pool.autoscaling.maxReplicaCount)) }}
{{- $problems = append $problems (printf "workers.pools.%s.autoscaling: minReplicaCount above maxReplicaCount" $name) }}
{{- end }}
{{- if and (eq (include "influence.autoscaler" (dict "root" $ "spec" $pool)) "keda") (not $redis.enabled) (not $.Values.workers.keda.address) }}
{{- $problems = append $problems (printf "workers.keda.address: pool %s autoscales with KEDA on an external Redis: set its host:port (and passwordSecret if it has one)" $name) }}
{{- end }}
{{- end }}
{{- $taken := list }}
{{- range $name, $pool := $pools }}
{{- $taken = concat $taken (default list $pool.kinds) }}
{{- end }}
{{- $untaken := list }}
{{- range $kind := list "register" "covariance" "eigen" "correction" "finalize" "prepare" "score" "merge" "self" "self_merge" "blocks" "fit_one_shard" "score_one_shard" "index_shard" "index_publish" "index_prepare" "index_score" "index_merge" }}
{{- if not (has $kind $taken) }}
{{- $untaken = append $untaken $kind }}
{{- end }}
{{- end }}
{{- if $untaken }}
{{- $problems = append $problems (printf "workers.pools: no enabled pool takes %s; tasks of these kinds would wait forever (add them to a pool's kinds)" (join ", " $untaken)) }}
{{- end }}
{{- if $problems }}
{{- fail (printf "\n\ninvalid values for the influence chart:\n  - %s\n" (join "\n  - " $problems)) }}
{{- end }}
{{- end }}

{{/*
Environment of every influence pod; INFLUENCE_LOG_LEVEL, the queue settings and the caches' places
come from the ConfigMap. Secrets are referenced, never inlined: the Redis URL (external) or
password (in-chart, expanded into the URL by the kubelet), and the S3 keys when static.
*/}}
{{- define "influence.env" -}}
{{- if .Values.redis.enabled }}
{{- if include "influence.redisAuth" . }}
- name: INFLUENCE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "influence.redisSecretName" . }}
      key: password
- name: INFLUENCE_REDIS_URL
  value: "redis://:$(INFLUENCE_REDIS_PASSWORD)@{{ include "influence.redisHost" . }}:6379/0"
{{- else }}
- name: INFLUENCE_REDIS_URL
  value: "redis://{{ include "influence.redisHost" . }}:6379/0"
{{- end }}
{{- else }}
- name: INFLUENCE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "influence.redisSecretName" . }}
      key: url
{{- end }}
- name: INFLUENCE_STORE_URL
  value: {{ include "influence.storeUrl" . | quote }}
{{- if include "influence.staticS3Keys" . }}
- name: INFLUENCE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "influence.secretName" . }}
      key: accessKey
- name: INFLUENCE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "influence.secretName" . }}
      key: secretKey
{{- else }}
- name: INFLUENCE_S3_CREDENTIALS
  value: chain
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Environment of the pods that serve the API: the request limits (`limits`, read by
`influence serve`). Not in the ConfigMap, so changing a limit rolls the API pods only; `int64`
keeps large values out of float notation. */}}
{{- define "influence.limitsEnv" -}}
{{- $names := dict "maxMessageBytes" "INFLUENCE_MAX_MESSAGE_BYTES" "maxStreamsPerTenant" "INFLUENCE_MAX_STREAMS_PER_TENANT" "maxUnauthenticatedStreams" "INFLUENCE_MAX_UNAUTHENTICATED_STREAMS" "maxUploadBytes" "INFLUENCE_MAX_UPLOAD_BYTES" "maxQueries" "INFLUENCE_MAX_QUERIES" "maxQueryChars" "INFLUENCE_MAX_QUERY_CHARS" "maxTopK" "INFLUENCE_MAX_TOP_K" "maxDatasetSequences" "INFLUENCE_MAX_DATASET_SEQUENCES" }}
{{- range $key := keys $names | sortAlpha }}
- name: {{ index $names $key }}
  value: {{ index $.Values.limits $key | int64 | quote }}
{{- end }}
{{- end }}

{{/* The fit planner's budget on the API pods (engine/budget.py WorkerBudget.of_process). */}}
{{- define "influence.budgetEnv" -}}
- name: INFLUENCE_WORKER_HOST_GIB
  value: {{ .Values.workerBudget.hostGiB | quote }}
{{- if .Values.workerBudget.deviceGiB }}
- name: INFLUENCE_WORKER_DEVICE_GIB
  value: {{ .Values.workerBudget.deviceGiB | quote }}
{{- end }}
{{- end }}

{{- define "influence.envFrom" -}}
- configMapRef:
    name: {{ include "influence.fullname" . }}
{{- end }}

{{/* Pod annotations that roll the pods when the chart's config or credentials change. */}}
{{- define "influence.checksums" -}}
checksum/config: {{ printf "%s\n%s\n%s" (include (print .Template.BasePath "/config.yaml") .) .Values.redis.url .Values.redis.auth.password | sha256sum }}
{{- end }}

{{/* Volumes of every influence pod: scratch (the writable place), models, extraVolumes. */}}
{{- define "influence.volumes" -}}
volumes:
- name: scratch
  emptyDir:
    {{- with .Values.scratch.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.scratch.sizeLimit }}
{{- if .Values.models.volume }}
- name: models
  {{- toYaml .Values.models.volume | nindent 2 }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "influence.volumeMounts" -}}
volumeMounts:
- name: scratch
  mountPath: /scratch
{{- if .Values.models.volume }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod metadata labels: the chart's, the component, then the chart-wide and the component's podLabels. */}}
{{- define "influence.podLabels" -}}
{{ include "influence.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .root.Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- with .spec.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "influence.podAnnotations" -}}
{{ include "influence.checksums" .root }}
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- with .spec.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Scheduling of a component's pods (`spec`: its values; `component`: its label). */}}
{{- define "influence.scheduling" -}}
{{- $priority := .spec.priorityClassName | default .root.Values.priorityClassName }}
{{- with $priority }}
priorityClassName: {{ . }}
{{- end }}
{{- with .spec.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range $constraint := . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $constraint = merge (dict "labelSelector" (dict "matchLabels" (merge (include "influence.selectorLabels" $.root | fromYaml) (dict "app.kubernetes.io/component" $.component)))) $constraint }}
{{- end }}
- {{- toYaml $constraint | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* KEDA's view of Redis: in-chart (found by itself) or workers.keda for an external one. */}}
{{- define "influence.kedaAddress" -}}
{{- if .Values.redis.enabled }}{{ include "influence.redisHost" . }}.{{ .Release.Namespace }}.svc:6379{{ else }}{{ .Values.workers.keda.address }}{{ end }}
{{- end }}

{{- define "influence.kedaDatabase" -}}
{{- if .Values.redis.enabled }}0{{ else }}{{ int .Values.workers.keda.databaseIndex }}{{ end }}
{{- end }}

{{- define "influence.kedaPasswordRef" -}}
{{- if .Values.redis.enabled }}
name: {{ include "influence.redisSecretName" . }}
key: password
{{- else }}
{{- toYaml .Values.workers.keda.passwordSecret }}
{{- end }}
{{- end }}

{{/* "true" when some pool autoscales and KEDA needs a password for Redis. */}}
{{- define "influence.kedaAuth" -}}
{{- $pools := include "influence.pools" . | fromYaml }}
{{- $scaled := false }}
{{- range $name, $pool := $pools }}{{ if eq (include "influence.autoscaler" (dict "root" $ "spec" $pool)) "keda" }}{{ $scaled = true }}{{ end }}{{ end }}
{{- if and $scaled (or (include "influence.redisAuth" .) (and (not .Values.redis.enabled) .Values.workers.keda.passwordSecret.name)) }}true{{ end }}
{{- end }}
