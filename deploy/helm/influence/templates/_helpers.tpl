{{- define "influence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

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

{{- define "influence.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "influence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "influence.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "influence.labels" -}}
helm.sh/chart: {{ include "influence.chart" . }}
{{ include "influence.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
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
redis://{{ include "influence.fullname" . }}-redis:6379/0
{{- else -}}
{{ .Values.redis.url }}
{{- end }}
{{- end }}

{{- define "influence.secretName" -}}
{{- default (printf "%s-object-store" (include "influence.fullname" .)) .Values.objectStore.existingSecret }}
{{- end }}

{{/* Every problem with the values at once, as one failure. */}}
{{- define "influence.validateValues" -}}
{{- $problems := list }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.url) }}
{{- $problems = append $problems "redis: set redis.url when redis.enabled is false" }}
{{- end }}
{{- if not .Values.objectStore.endpoint }}
{{- $problems = append $problems "objectStore.endpoint is empty" }}
{{- end }}
{{- if not .Values.objectStore.bucket }}
{{- $problems = append $problems "objectStore.bucket is empty" }}
{{- end }}
{{- if and (not .Values.objectStore.existingSecret) (or (not .Values.objectStore.accessKey) (not .Values.objectStore.secretKey)) }}
{{- $problems = append $problems "objectStore: set existingSecret, or both accessKey and secretKey" }}
{{- end }}
{{- range $name, $pool := .Values.workers.pools }}
{{- if and (gt (int (default 0 $pool.gpus)) 0) (or (hasKey (default dict ($pool.resources).limits) "nvidia.com/gpu") (hasKey (default dict ($pool.resources).requests) "nvidia.com/gpu")) }}
{{- $problems = append $problems (printf "workers.pools.%s: set gpus, not nvidia.com/gpu in resources (the chart sets limits = requests = gpus)" $name) }}
{{- end }}
{{- end }}
{{- if $problems }}
{{- fail (printf "\ninvalid values:\n  - %s" (join "\n  - " $problems)) }}
{{- end }}
{{- end }}

{{/* Environment shared by every pod of the system. */}}
{{- define "influence.env" -}}
- name: INFLUENCE_REDIS_URL
  value: {{ include "influence.redisUrl" . | quote }}
- name: INFLUENCE_STORE_URL
  value: {{ printf "s3://%s?endpoint=%s&secure=%d&region=%s" .Values.objectStore.bucket .Values.objectStore.endpoint (ternary 1 0 .Values.objectStore.secure) .Values.objectStore.region | quote }}
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
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}

{{- define "influence.modelVolume" -}}
{{- if .Values.models.volume }}
volumes:
- name: models
{{- toYaml .Values.models.volume | nindent 2 }}
{{- end }}
{{- end }}

{{- define "influence.modelMount" -}}
{{- if .Values.models.volume }}
volumeMounts:
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end }}
