{{/* Security of the API pods (docs/reliability.md#security): bearer tokens from a Secret, TLS. */}}

{{/* Environment of the API pods only: where the mounted tokens file and TLS files are. */}}
{{- define "influence.securityEnv" -}}
{{- if .Values.auth.existingSecret }}
- name: INFLUENCE_AUTH_TOKENS
  value: /etc/influence/auth/{{ .Values.auth.key }}
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: INFLUENCE_SERVE_TLS_CERT
  value: /etc/influence/tls/tls.crt
- name: INFLUENCE_SERVE_TLS_KEY
  value: /etc/influence/tls/tls.key
{{- if .Values.tls.requireClientCertificates }}
- name: INFLUENCE_SERVE_TLS_CLIENT_CA
  value: /etc/influence/tls/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/* The API pods' extra volumeMounts (after influence.volumeMounts): the Secrets. The tokens
Secret is mounted as a directory (no subPath), so Kubernetes' updates of it reach the file, and the
server re-reads it: tokens rotate without a restart. */}}
{{- define "influence.apiSecretMounts" -}}
{{- if .Values.auth.existingSecret }}
- name: auth-tokens
  mountPath: /etc/influence/auth
  readOnly: true
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: /etc/influence/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "influence.apiSecretVolumes" -}}
{{- if .Values.auth.existingSecret }}
- name: auth-tokens
  secret:
    secretName: {{ .Values.auth.existingSecret }}
    items: [{key: {{ .Values.auth.key | quote }}, path: {{ .Values.auth.key | quote }}}]
    defaultMode: 0444  # the pods run as a non-root user without fsGroup
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 0444  # the pods run as a non-root user without fsGroup
{{- end }}
{{- end }}
