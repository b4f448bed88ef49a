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

{{- define "influence.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "influence.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "influence.componentName" (dict "root" . "component" "redis") }}:6379/0
{{- else -}}
{{ .Values.redis.url }}
{{- end }}
{{- end }}

{{- define "influence.storeUrl" -}}
{{- with .Values.objectStore -}}
{{ printf "s3://%s?endpoint=%s&secure=%d&region=%s" .bucket .endpoint (ternary 1 0 .secure) .region }}
{{- end }}
{{- end }}

{{- define "influence.secretName" -}}
{{- default (include "influence.componentName" (dict "root" . "component" "object-store")) .Values.objectStore.existingSecret }}
{{- end }}

{{/* True ("true") when a pool is enabled; a pool without the key is enabled. */}}
{{- define "influence.poolEnabled" -}}
{{- if or (not (hasKey . "enabled")) .enabled }}true{{ end }}
{{- end }}

{{/*
Every problem with the values, reported at once by one `fail`. values.schema.json checks
types and unknown keys first; this checks what a schema cannot say well.
*/}}
{{- define "influence.validateValues" -}}
{{- $problems := list }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.url) }}
{{- $problems = append $problems "redis.url: required when redis.enabled is false (an external Redis, redis://host:port/db)" }}
{{- end }}
{{- if and .Values.redis.url (not (regexMatch "^rediss?://" .Values.redis.url)) }}
{{- $problems = append $problems (printf "redis.url: %q must start with redis:// or rediss://" .Values.redis.url) }}
{{- end }}
{{- if not .Values.objectStore.endpoint }}
{{- $problems = append $problems "objectStore.endpoint: empty; set the S3 endpoint as host:port" }}
{{- else if contains "://" .Values.objectStore.endpoint }}
{{- $problems = append $problems (printf "objectStore.endpoint: %q must be host:port without a scheme (use objectStore.secure for TLS)" .Values.objectStore.endpoint) }}
{{- end }}
{{- if not .Values.objectStore.bucket }}
{{- $problems = append $problems "objectStore.bucket: empty" }}
{{- end }}
{{- if and (not .Values.objectStore.existingSecret) (or (not .Values.objectStore.accessKey) (not .Values.objectStore.secretKey)) }}
{{- $problems = append $problems "objectStore: set existingSecret, or both accessKey and secretKey" }}
{{- end }}
{{- range $name, $pool := .Values.workers.pools }}
{{- if include "influence.poolEnabled" $pool }}
{{- $limits := default dict (default dict $pool.resources).limits }}
{{- $requests := default dict (default dict $pool.resources).requests }}
{{- if $pool.gpu }}
{{- if not (gt (int (default 0 (index $limits "nvidia.com/gpu"))) 0) }}
{{- $problems = append $problems (printf "workers.pools.%s: a GPU pool (gpu: true) needs resources.limits.nvidia.com/gpu >= 1" $name) }}
{{- else if and (hasKey $requests "nvidia.com/gpu") (ne (int (index $requests "nvidia.com/gpu")) (int (index $limits "nvidia.com/gpu"))) }}
{{- $problems = append $problems (printf "workers.pools.%s: resources.requests.nvidia.com/gpu must equal limits (or be left out)" $name) }}
{{- end }}
{{- else if or (hasKey $limits "nvidia.com/gpu") (hasKey $requests "nvidia.com/gpu") }}
{{- $problems = append $problems (printf "workers.pools.%s: nvidia.com/gpu resources on a pool with gpu: false; set gpu: true (or remove them with nvidia\\.com/gpu=null)" $name) }}
{{- end }}
{{- if not $pool.kinds }}
{{- $problems = append $problems (printf "workers.pools.%s: kinds is empty" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $taken := list }}
{{- range $name, $pool := .Values.workers.pools }}
{{- if include "influence.poolEnabled" $pool }}
{{- $taken = concat $taken (default list $pool.kinds) }}
{{- end }}
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

{{/* Environment of every influence pod; INFLUENCE_LOG_LEVEL and the queue settings come from the ConfigMap. */}}
{{- define "influence.env" -}}
- name: INFLUENCE_REDIS_URL
  value: {{ include "influence.redisUrl" . | quote }}
- name: INFLUENCE_STORE_URL
  value: {{ include "influence.storeUrl" . | quote }}
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
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}

{{- define "influence.envFrom" -}}
- configMapRef:
    name: {{ include "influence.fullname" . }}
{{- end }}

{{/* Pod annotations that roll the pods when the chart's config or credentials change. */}}
{{- define "influence.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/config.yaml") . | sha256sum }}
{{- end }}

{{- define "influence.modelVolumes" -}}
{{- if .Values.models.volume -}}
volumes:
- name: models
  {{- toYaml .Values.models.volume | nindent 2 }}
{{- end }}
{{- end }}

{{- define "influence.modelMounts" -}}
{{- if .Values.models.volume -}}
volumeMounts:
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end }}
